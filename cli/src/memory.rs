//! The binary's allocators: mimalloc for Rust, glibc's `malloc` for librdkafka.
//!
//! # Contract
//! mimalloc is the global allocator of every command. [`tune`] is for the long-running
//! services only (`main` decides which commands those are): it runs in `main` before any other
//! thread exists, and starts two threads of its own. Afterwards:
//! - memory freed while the process is busy stays mapped for [`BUSY_PURGE_DELAY_MS`], so
//!   the next batch reuses it instead of faulting fresh zeroed pages in;
//! - [`IDLE_LOOKS`] looks after the process went idle, mimalloc hands what was freed back
//!   to the OS, so a service at rest is about as small as when purging at once: the arenas
//!   at once, and what each tokio worker's heap holds when that worker next parks
//!   ([`on_worker_park`], which `main` installs on its runtime). Memory freed in the
//!   instant between the two steps of the switch stays mapped until the next busy spell;
//! - every [`C_HEAP_TRIM_EVERY`] glibc returns the free pages of its arenas;
//! - the process (and any process it starts) gets no transparent huge pages: memory is
//!   faulted in 4 KiB at a time, not 2 MiB ([`no_transparent_huge_pages`]).
//!
//! An operator's `MIMALLOC_PURGE_DELAY` wins over the first two of these, `MALLOC_ARENA_MAX`
//! over glibc's arena cap (the trim still runs), and `MIMALLOC_ALLOW_THP` over the last.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libc::c_long;
use libmimalloc_sys::{mi_collect, mi_option_set, mi_option_t, mi_process_info};

/// Every service runs in this binary; see the `mimalloc` note in Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's option `mi_option_purge_delay`, in milliseconds (1000 by default in the v3
/// allocator built here). The bindings name only some of mimalloc's options; this one sits
/// just before `mi_option_use_numa_nodes` in the option enum of both the v2 and v3 headers,
/// which the assertion below and a test of its default hold to.
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;
const _: () = assert!(MI_OPTION_PURGE_DELAY + 1 == libmimalloc_sys::mi_option_use_numa_nodes);

/// How long mimalloc keeps freed memory mapped while the process is busy. A lane's batch
/// frees megabytes that the next batch, well within this, allocates again: reusing them
/// costs no page faults, purging and faulting them in again roughly doubles the faults.
pub const BUSY_PURGE_DELAY_MS: c_long = 1000;
/// How often the process's CPU time is looked at.
pub const LOOK_EVERY: Duration = Duration::from_millis(500);
/// CPU time within one look above which the process counts as busy (a tenth of a core).
pub const BUSY_CPU_PER_LOOK: Duration = Duration::from_millis(50);
/// Consecutive looks at or below [`BUSY_CPU_PER_LOOK`] after which a busy process counts as
/// idle: a load that hovers at the threshold does not purge and fault its memory in again
/// every look.
pub const IDLE_LOOKS: u32 = 2;
/// How often freed C heap pages are handed back to the OS.
const C_HEAP_TRIM_EVERY: Duration = Duration::from_secs(2);

/// Sets up both allocators for a service (module docs).
pub fn tune() {
    no_transparent_huge_pages();
    adapt_mimalloc_purging();
    keep_c_heap_small();
}

/// What the purge janitor does after a look at the process's CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purging {
    /// Busy from now on: keep freed memory mapped for [`BUSY_PURGE_DELAY_MS`].
    Delay,
    /// Idle from now on: purge at once, and everything freed so far.
    AtOnce,
}

/// Whether the process is busy, from its CPU time per look. Starts idle.
#[derive(Debug, Default)]
pub struct Activity {
    busy: bool,
    last_cpu: Option<Duration>,
    /// Consecutive quiet looks while busy.
    quiet_looks: u32,
}

impl Activity {
    /// Takes the process's total CPU time at a look; returns what to change, if anything.
    pub fn look(&mut self, total_cpu: Duration) -> Option<Purging> {
        let used = total_cpu.saturating_sub(self.last_cpu.unwrap_or(total_cpu));
        self.last_cpu = Some(total_cpu);
        let quiet = used <= BUSY_CPU_PER_LOOK;
        self.quiet_looks = if quiet { self.quiet_looks.saturating_add(1) } else { 0 };
        let busy = if self.busy { self.quiet_looks < IDLE_LOOKS } else { !quiet };
        if busy == self.busy {
            return None;
        }
        self.busy = busy;
        Some(if busy { Purging::Delay } else { Purging::AtOnce })
    }
}

/// Purges freed memory at once while idle and after [`BUSY_PURGE_DELAY_MS`] while busy,
/// switching on a thread of its own (module docs). By default mimalloc delays purges and
/// then purges only when a thread allocates again, so memory a large batch freed on a
/// tokio worker that then idles would stay resident, and a service at rest would stay as
/// large as its last burst made it.
fn adapt_mimalloc_purging() {
    if operator_mimalloc_option(&["PURGE_DELAY", "RESET_DELAY"]).is_some() {
        return;
    }
    // SAFETY: a plain call into the linked mimalloc with an option id of its enum.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let janitor = std::thread::Builder::new().name("mem-purge".into()).spawn(|| {
        let mut activity = Activity::default();
        loop {
            std::thread::sleep(LOOK_EVERY);
            match activity.look(process_cpu_time()) {
                // SAFETY: plain calls into the linked mimalloc; options may change at any time,
                // and a collect from any thread purges the arenas of the whole process.
                Some(Purging::Delay) => unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, BUSY_PURGE_DELAY_MS) },
                // In this order: with a delay of 0 mimalloc skips its purge pass, so the
                // memory scheduled for a delayed purge would stay.
                Some(Purging::AtOnce) => unsafe {
                    mi_collect(true);
                    mi_option_set(MI_OPTION_PURGE_DELAY, 0);
                    IDLE_SPELLS.fetch_add(1, Ordering::Relaxed);
                },
                None => {}
            }
        }
    });
    if let Err(e) = janitor {
        eprintln!("warning: could not start the memory purge thread: {e}");
    }
}

/// The value the environment gives one of mimalloc's options, each given by its `names` (the
/// purge delay also goes by its old name, reset delay), if it gives one.
fn operator_mimalloc_option(names: &[&str]) -> Option<String> {
    std::env::vars_os().find_map(|(variable, value)| {
        let set = variable.to_str().is_some_and(|v| sets_mimalloc_option(v, names));
        set.then(|| value.to_string_lossy().into_owned())
    })
}

/// Whether the environment variable `variable` sets one of mimalloc's options `names`:
/// mimalloc reads `MIMALLOC_<NAME>` in any letter case.
fn sets_mimalloc_option(variable: &str, names: &[&str]) -> bool {
    names.iter().any(|name| variable.eq_ignore_ascii_case(&format!("MIMALLOC_{name}")))
}

/// Whether mimalloc reads an on/off option's `value` as on: off is `0`, `false`, `no` or
/// `off` in any case, or a number that is 0; anything else leaves the option at its
/// default, which for `ALLOW_THP` is on.
fn mimalloc_reads_as_on(value: &str) -> bool {
    let value = value.to_ascii_uppercase();
    !(["0", "FALSE", "NO", "OFF"].contains(&value.as_str()) || value.parse::<i64>() == Ok(0))
}

/// Turns transparent huge pages off for the process (`PR_SET_THP_DISABLE`), unless the
/// operator set `MIMALLOC_ALLOW_THP`: then mimalloc's own reading of it decides, and an
/// allowing value also clears a flag inherited from a parent. Processes this one starts
/// inherit the flag: the services `tally bench` starts, and its `redis-benchmark` baseline
/// (with the kernel's huge pages in `madvise` mode, that changes nothing for a program
/// that does not ask for them). mimalloc asks the kernel for huge pages on the memory it
/// maps, and the kernel then zeroes 2 MiB at each first touch of a huge page, also after
/// every purge: with the purging above, that zeroing costs a service more CPU per event
/// than huge pages save (cli/src/DESIGN.md).
#[cfg(target_os = "linux")]
fn no_transparent_huge_pages() {
    let disable = match operator_mimalloc_option(&["ALLOW_THP"]) {
        None => true,
        Some(value) if mimalloc_reads_as_on(&value) => false,
        Some(_) => return,
    };
    // SAFETY: prctl with a documented option and its arguments; it only sets a flag of the
    // process's memory map.
    if unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, libc::c_ulong::from(disable), 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    } != 0
    {
        eprintln!("warning: could not set whether the process gets transparent huge pages: {}", std::io::Error::last_os_error());
    }
}

#[cfg(not(target_os = "linux"))]
fn no_transparent_huge_pages() {}

/// How many times the process went idle; each worker thread collects once per count.
static IDLE_SPELLS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The [`IDLE_SPELLS`] count this thread last collected at.
    static COLLECTED_AT: Cell<u64> = const { Cell::new(0) };
}

/// Run by each tokio worker before it parks: after the process went idle, hands back what
/// this thread's mimalloc heap still holds (pages it owns whose blocks other threads freed,
/// empty pages it kept for reuse), which a collect on another thread cannot reach. A worker
/// that parked before the process counted as idle does this when it next wakes and parks
/// (a timer, a heartbeat); one that never wakes keeps its heap's pages.
pub fn on_worker_park() {
    let idle_spells = IDLE_SPELLS.load(Ordering::Relaxed);
    if COLLECTED_AT.get() != idle_spells {
        COLLECTED_AT.set(idle_spells);
        // SAFETY: a plain call into the linked mimalloc, on the thread whose heap it collects.
        unsafe { mi_collect(true) };
    }
}

/// The user and system CPU time of the whole process so far.
fn process_cpu_time() -> Duration {
    let (mut user, mut system) = (0usize, 0usize);
    let null = std::ptr::null_mut();
    // SAFETY: mimalloc writes the outputs whose pointers are not null.
    unsafe { mi_process_info(null, &mut user, &mut system, null, null, null, null, null) };
    Duration::from_millis((user + system) as u64)
}

/// Keeps what the C allocator holds for librdkafka (which uses `malloc`, not the global
/// allocator above) from staying resident after a burst: at most 2 arenas, and every
/// [`C_HEAP_TRIM_EVERY`] a `malloc_trim`, which hands the free pages inside the arenas back
/// to the OS. Without it glibc keeps them, and after a burst most of an aggregator's memory
/// can be glibc arenas full of freed fetch data. An operator's `MALLOC_ARENA_MAX` (or
/// `glibc.malloc.arena_max` in `GLIBC_TUNABLES`) wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_c_heap_small() {
    let tuned = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc.arena_max"));
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() && !tuned {
        // SAFETY: mallopt with a documented parameter, before any other thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
    let trimmer = std::thread::Builder::new().name("c-heap-trim".into()).spawn(|| loop {
        std::thread::sleep(C_HEAP_TRIM_EVERY);
        // SAFETY: malloc_trim is thread-safe; it takes each arena's lock in turn.
        unsafe { libc::malloc_trim(0) };
    });
    if let Err(e) = trimmer {
        eprintln!("warning: could not start the C heap trimmer: {e}");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_c_heap_small() {}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn purging_is_delayed_once_the_process_gets_busy_and_at_once_again_when_it_idles() {
        let mut activity = Activity::default();
        let mut cpu = ms(10_000);
        let mut look_after = |used: Duration| {
            cpu += used;
            activity.look(cpu)
        };
        assert_eq!(look_after(ms(0)), None, "the first look only takes the baseline");
        assert_eq!(look_after(BUSY_CPU_PER_LOOK), None, "at the threshold it is not busy yet");
        assert_eq!(look_after(ms(400)), Some(Purging::Delay));
        assert_eq!(look_after(ms(400)), None, "still busy: nothing to change");
        assert_eq!(look_after(ms(10)), None, "one quiet look is not idle yet");
        assert_eq!(look_after(ms(400)), None, "busy again: the quiet looks start over");
        for _ in 1..IDLE_LOOKS {
            assert_eq!(look_after(ms(10)), None);
        }
        assert_eq!(look_after(ms(10)), Some(Purging::AtOnce), "idle after {IDLE_LOOKS} quiet looks");
        assert_eq!(look_after(ms(0)), None, "still idle: nothing to change");
        assert_eq!(look_after(ms(60)), Some(Purging::Delay), "one busy look is busy at once");
    }

    #[test]
    fn an_option_is_set_by_its_variable_in_any_case_and_by_no_other() {
        let names = ["PURGE_DELAY", "RESET_DELAY"];
        for set in ["MIMALLOC_PURGE_DELAY", "mimalloc_purge_delay", "Mimalloc_Reset_Delay"] {
            assert!(sets_mimalloc_option(set, &names), "{set}");
        }
        for other in ["MIMALLOC_ALLOW_THP", "MIMALLOC_PURGE_DELAYS", "PURGE_DELAY", "MALLOC_PURGE_DELAY", "MIMALLOC_"] {
            assert!(!sets_mimalloc_option(other, &names), "{other}");
        }
    }

    #[test]
    fn an_on_off_option_is_off_only_for_what_mimalloc_reads_as_off() {
        for off in ["0", "false", "No", "OFF", "00", "-0"] {
            assert!(!mimalloc_reads_as_on(off), "{off:?}");
        }
        for on in ["1", "true", "yes", "On", "", "2", "maybe"] {
            assert!(mimalloc_reads_as_on(on), "{on:?}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off_afterwards() {
        assert_eq!(operator_mimalloc_option(&["ALLOW_THP"]), None, "run the tests without MIMALLOC_ALLOW_THP in the environment");
        no_transparent_huge_pages();
        // SAFETY: prctl with a documented option that only reads the flag.
        let disabled = unsafe {
            libc::prctl(libc::PR_GET_THP_DISABLE, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
        };
        assert_eq!(disabled, 1, "PR_GET_THP_DISABLE");
        let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
        if let Some(line) = status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(line.split_whitespace().nth(1), Some("0"), "{line}");
        }
    }

    #[test]
    fn the_purge_delay_option_is_the_one_that_defaults_to_a_second() {
        if operator_mimalloc_option(&["PURGE_DELAY", "RESET_DELAY"]).is_some() {
            return;
        }
        // SAFETY: a plain read of one of the linked mimalloc's options; nothing in the tests
        // sets it.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1000, "mimalloc v3's default purge delay");
    }

    #[test]
    fn the_process_cpu_time_grows_with_work() {
        let before = process_cpu_time();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut x = 0u64;
        while process_cpu_time() < before + ms(50) {
            assert!(std::time::Instant::now() < deadline, "30 s of spinning did not add 50 ms of CPU time");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
    }
}
