//! Periods: which window of time a usage event counts in, and when a quota resets.
//!
//! # Grammar
//!
//! [`PeriodSpec`] parses from (and displays back to) one short string. Words are
//! lowercase; spaces between a number and its unit are optional.
//!
//! | written                                   | spec                          |
//! |-------------------------------------------|-------------------------------|
//! | `day` `d` · `week` `w` `wk` · `month` `mo` `mon` · `year` `y` `yr` (plurals too) | calendar [`PeriodSpec::Day`], [`Week`](PeriodSpec::Week), [`Month`](PeriodSpec::Month), [`Year`](PeriodSpec::Year) |
//! | `month@D` (`D` in 1..=31)                 | [`PeriodSpec::MonthAnchored`] on billing day `D` |
//! | `s` `m` `h` or `second` `minute` `hour`   | fixed window of one unit       |
//! | `N` + `s`/`sec`/`second(s)`, `m`/`min`/`minute(s)`, `h`/`hr`/`hour(s)`, `d`/`day(s)` | fixed window of `N` units, e.g. `30s`, `5m`, `2h`, `1d` |
//! | `rolling Nd`, `rolling N days`, `Nd rolling`, `N days rolling` | [`PeriodSpec::Rolling`] over `N` days |
//!
//! A bare calendar word is a calendar period in the subject's timezone; a number makes
//! it a fixed window aligned to the UTC epoch: `day` resets at local midnight, `1d` at
//! 00:00 UTC. Weeks, months and years take no number. Fixed and rolling windows are at
//! most 366 days long. `Display` prints the canonical form (`day`, `month@15`, `90s`,
//! `5m`, `2h`, `1d`, `rolling 7d`), which parses back to the same value.
//!
//! # Windows
//!
//! [`PeriodSpec::window`] gives the period containing an instant as a half-open
//! [`Window`] `[start, end)`.
//! - Calendar periods start at local midnight in the given timezone: days at midnight,
//!   weeks on Monday, months on the 1st, years on January 1st. A day lasts 23 or 25 hours
//!   where the clock says so. A local midnight that does not exist (the clock jumps over
//!   it) starts at the first instant after the gap; an ambiguous one (the clock passes it
//!   twice) starts at its first occurrence, so every instant lies in exactly one period.
//! - An anchored month on billing day `D` runs from local midnight of day `D` to local
//!   midnight of day `D` of the next month; in months shorter than `D` days the anchor is
//!   the month's last day.
//! - Fixed windows are multiples of their length since 1970-01-01T00:00:00Z; the timezone
//!   is ignored.
//! - A rolling window of `N` days (exactly `N × 86 400` seconds, whatever the timezone) is
//!   the one period that does not tile time: at instant `at` it holds the usage with
//!   `at − N days < time ≤ at`. [`PeriodSpec::window`] returns `start = at − N days` and
//!   `end = at`, and [`PeriodSpec::includes`] applies that open-closed rule. Usage at `t`
//!   leaves the window at exactly `t + N days`; [`rolling_unblock_at`] finds when a
//!   breached subject is allowed again.
//!
//! # Rolling buckets
//!
//! A rolling window is not stored event by event: its usage is summed in buckets whose
//! length follows the window, `N` minutes for `N` days ([`rolling_bucket_seconds`]), aligned
//! to the UTC epoch ([`rolling_bucket`]). One window spans
//! [`ROLLING_BUCKETS_PER_WINDOW`] = 1440 buckets, so a subject's usage of one rolling quota
//! takes at most 1441 buckets that have not left the window (plus any dated in the future),
//! however much traffic it has.
//!
//! Contract of a [`RollingBucket`] `[start, end)` in a window of `N` days: its usage counts
//! from `start` (the earliest any of it may have entered) until `end + N days`, exclusive
//! (the instant its latest possible usage leaves). So the usage a bucketed window reports
//! is never less than the exact per-event sum (for usage that is not negative; a
//! correction lands in the same bucket as the event it reverts), and a breached subject is
//! never allowed before all of its counted usage has truly left: the unblock instant is
//! exact to the bucket, never earlier than the per-event instant and, when no usage is
//! dated after the decision, at most one bucket later. Buckets of any length follow the
//! same rule, so rows of other lengths (one-second rows of older versions) count
//! correctly beside them; a bucket of one instant is the exact per-event rule.
//!
//! Nothing here reads a clock: callers pass `at`.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Days, Duration, Months, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeZone, Utc};
use chrono_tz::Tz;

/// Seconds in a day.
pub const DAY_SECONDS: u64 = 86_400;
/// The longest fixed or rolling window, in days.
pub const MAX_WINDOW_DAYS: u64 = 366;

/// How a quota's usage is grouped in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeriodSpec {
    /// Local midnight to local midnight.
    Day,
    /// Monday 00:00 local to the next Monday 00:00 local.
    Week,
    /// The 1st 00:00 local to the next month's 1st.
    Month,
    /// Billing day `day` (1..=31, clamped to the month's last day) to the same day of the
    /// next month, at local midnight.
    MonthAnchored { day: u8 },
    /// January 1st 00:00 local to the next January 1st.
    Year,
    /// Windows of `seconds` aligned to the UTC epoch.
    Fixed { seconds: u64 },
    /// The last `days` × 24 hours.
    Rolling { days: u32 },
}

/// An interval of time. For every spec but [`PeriodSpec::Rolling`] it is half-open:
/// `start` inclusive, `end` exclusive (see [`PeriodSpec::includes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Window {
    /// Whether `t` lies in `[start, end)`.
    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.start <= t && t < self.end
    }

    pub fn duration(&self) -> Duration {
        self.end - self.start
    }
}

/// Why a period string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeriodError {
    #[error("empty period: expected e.g. `day`, `month`, `month@15`, `5m` or `rolling 7d`")]
    Empty,
    #[error("missing number in `{input}`: expected e.g. `rolling 7d`")]
    MissingNumber { input: String },
    #[error("missing unit after the number in `{input}`: expected s, m, h or d, e.g. `{input}s`")]
    MissingUnit { input: String },
    #[error("unknown unit `{unit}` in `{input}`: expected s, m, h, d, day, week, month or year")]
    UnknownUnit { unit: String, input: String },
    #[error("zero-length window `{input}`: the number must be at least 1")]
    ZeroWindow { input: String },
    #[error("negative window `{input}`: the number must be at least 1")]
    NegativeWindow { input: String },
    #[error("trailing `{garbage}` after `{input}`")]
    TrailingGarbage { garbage: String, input: String },
    #[error("`{input}` is not a period: expected a number and a unit, or a word such as `day`")]
    Unexpected { input: String },
    #[error("`{unit}` is a calendar unit and takes no number: write `{unit}` (or use days, e.g. `30d`)")]
    CountOnCalendarUnit { unit: String },
    #[error("a rolling window is counted in days (e.g. `rolling 7d`), not `{unit}`")]
    RollingUnit { unit: String },
    #[error("billing day `{day}` in `{input}` must be a whole number from 1 to 31")]
    BadAnchorDay { day: String, input: String },
    #[error("window `{input}` is longer than {max_days} days; use a calendar period")]
    TooLong { input: String, max_days: u64 },
}

/// The unit families the grammar knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    fn from_word(word: &str) -> Option<Unit> {
        Some(match word {
            "s" | "sec" | "secs" | "second" | "seconds" => Unit::Second,
            "m" | "min" | "mins" | "minute" | "minutes" => Unit::Minute,
            "h" | "hr" | "hrs" | "hour" | "hours" => Unit::Hour,
            "d" | "day" | "days" => Unit::Day,
            "w" | "wk" | "week" | "weeks" => Unit::Week,
            "mo" | "mon" | "month" | "months" => Unit::Month,
            "y" | "yr" | "year" | "years" => Unit::Year,
            _ => return None,
        })
    }

    fn fixed_seconds(self) -> Option<u64> {
        match self {
            Unit::Second => Some(1),
            Unit::Minute => Some(60),
            Unit::Hour => Some(3_600),
            Unit::Day => Some(DAY_SECONDS),
            Unit::Week | Unit::Month | Unit::Year => None,
        }
    }
}

/// A leading whole number: `Ok(None)` when the text does not start with a digit or `-`.
fn take_count<'a>(text: &'a str, input: &str) -> Result<(Option<u64>, &'a str), PeriodError> {
    if let Some(rest) = text.strip_prefix('-') {
        if rest.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(PeriodError::NegativeWindow { input: input.to_string() });
        }
    }
    let end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    if end == 0 {
        return Ok((None, text));
    }
    let too_long = || PeriodError::TooLong { input: input.to_string(), max_days: MAX_WINDOW_DAYS };
    let count = text[..end].parse::<u64>().map_err(|_| too_long())?;
    Ok((Some(count), &text[end..]))
}

/// A leading run of ASCII letters and the rest.
fn take_word(text: &str) -> (&str, &str) {
    let end = text.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(text.len());
    text.split_at(end)
}

/// Parses `N unit` with nothing after it; the number is optional.
fn count_and_unit(text: &str, input: &str) -> Result<(Option<u64>, Unit), PeriodError> {
    let (count, rest) = take_count(text.trim(), input)?;
    let (word, tail) = take_word(rest.trim_start());
    if word.is_empty() {
        return Err(match (count, tail.trim().is_empty()) {
            (Some(_), true) => PeriodError::MissingUnit { input: input.to_string() },
            (None, _) => PeriodError::Unexpected { input: input.to_string() },
            (Some(_), false) => PeriodError::UnknownUnit { unit: tail.trim().to_string(), input: input.to_string() },
        });
    }
    let unit = Unit::from_word(word).ok_or_else(|| PeriodError::UnknownUnit { unit: word.to_string(), input: input.to_string() })?;
    if !tail.trim().is_empty() {
        return Err(PeriodError::TrailingGarbage { garbage: tail.trim().to_string(), input: input.to_string() });
    }
    Ok((count, unit))
}

fn parse_rolling(text: &str, input: &str) -> Result<PeriodSpec, PeriodError> {
    let (count, unit) = count_and_unit(text, input).map_err(|e| match e {
        PeriodError::Unexpected { .. } if text.trim().is_empty() => PeriodError::MissingNumber { input: input.to_string() },
        other => other,
    })?;
    if unit != Unit::Day {
        return Err(PeriodError::RollingUnit { unit: text.trim().trim_start_matches(|c: char| c.is_ascii_digit()).trim().to_string() });
    }
    let days = count.ok_or_else(|| PeriodError::MissingNumber { input: input.to_string() })?;
    if days == 0 {
        return Err(PeriodError::ZeroWindow { input: input.to_string() });
    }
    if days > MAX_WINDOW_DAYS {
        return Err(PeriodError::TooLong { input: input.to_string(), max_days: MAX_WINDOW_DAYS });
    }
    let days = u32::try_from(days).map_err(|_| PeriodError::TooLong { input: input.to_string(), max_days: MAX_WINDOW_DAYS })?;
    Ok(PeriodSpec::Rolling { days })
}

fn parse_anchored(word: &str, day: &str, input: &str) -> Result<PeriodSpec, PeriodError> {
    if Unit::from_word(word.trim()) != Some(Unit::Month) {
        return Err(PeriodError::UnknownUnit { unit: format!("{}@", word.trim()), input: input.to_string() });
    }
    let bad = || PeriodError::BadAnchorDay { day: day.trim().to_string(), input: input.to_string() };
    let day: u8 = day.trim().parse().map_err(|_| bad())?;
    if !(1..=31).contains(&day) {
        return Err(bad());
    }
    Ok(PeriodSpec::MonthAnchored { day })
}

impl FromStr for PeriodSpec {
    type Err = PeriodError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let input = s.trim();
        if input.is_empty() {
            return Err(PeriodError::Empty);
        }
        if let Some(rest) = input.strip_prefix("rolling") {
            if rest.is_empty() || rest.starts_with(|c: char| c.is_whitespace() || c.is_ascii_digit()) {
                return parse_rolling(rest, input);
            }
        }
        if let Some(rest) = input.strip_suffix("rolling") {
            if rest.ends_with(char::is_whitespace) {
                return parse_rolling(rest, input);
            }
        }
        if let Some((word, day)) = input.split_once('@') {
            return parse_anchored(word, day, input);
        }
        let (count, unit) = count_and_unit(input, input)?;
        spec_from(count, unit, input)
    }
}

fn spec_from(count: Option<u64>, unit: Unit, input: &str) -> Result<PeriodSpec, PeriodError> {
    let calendar = match unit {
        Unit::Day => Some(PeriodSpec::Day),
        Unit::Week => Some(PeriodSpec::Week),
        Unit::Month => Some(PeriodSpec::Month),
        Unit::Year => Some(PeriodSpec::Year),
        _ => None,
    };
    let unit_seconds = match (count, calendar, unit.fixed_seconds()) {
        (None, Some(calendar), _) => return Ok(calendar),
        (Some(_), _, None) => {
            let word = input.trim_start_matches(|c: char| c.is_ascii_digit()).trim();
            return Err(PeriodError::CountOnCalendarUnit { unit: word.to_string() });
        }
        (_, _, Some(seconds)) => seconds,
        (None, None, None) => return Err(PeriodError::Unexpected { input: input.to_string() }),
    };
    let count = count.unwrap_or(1);
    if count == 0 {
        return Err(PeriodError::ZeroWindow { input: input.to_string() });
    }
    match count.checked_mul(unit_seconds) {
        Some(seconds) if seconds <= MAX_WINDOW_DAYS * DAY_SECONDS => Ok(PeriodSpec::Fixed { seconds }),
        _ => Err(PeriodError::TooLong { input: input.to_string(), max_days: MAX_WINDOW_DAYS }),
    }
}

impl fmt::Display for PeriodSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeriodSpec::Day => f.write_str("day"),
            PeriodSpec::Week => f.write_str("week"),
            PeriodSpec::Month => f.write_str("month"),
            PeriodSpec::MonthAnchored { day } => write!(f, "month@{day}"),
            PeriodSpec::Year => f.write_str("year"),
            PeriodSpec::Fixed { seconds } => {
                let (n, unit) = [(DAY_SECONDS, "d"), (3_600, "h"), (60, "m")]
                    .into_iter()
                    .find(|(size, _)| *seconds != 0 && seconds % size == 0)
                    .map(|(size, unit)| (seconds / size, unit))
                    .unwrap_or((*seconds, "s"));
                write!(f, "{n}{unit}")
            }
            PeriodSpec::Rolling { days } => write!(f, "rolling {days}d"),
        }
    }
}

impl serde::Serialize for PeriodSpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for PeriodSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl PeriodSpec {
    /// Whether this spec follows the calendar of a timezone (day, week, month, year).
    pub fn is_calendar(&self) -> bool {
        matches!(self, PeriodSpec::Day | PeriodSpec::Week | PeriodSpec::Month | PeriodSpec::MonthAnchored { .. } | PeriodSpec::Year)
    }

    /// Whether consecutive windows of this spec tile time (all but rolling windows).
    pub fn tiles(&self) -> bool {
        !matches!(self, PeriodSpec::Rolling { .. })
    }

    /// The nominal length in seconds, for display and for `X-RateLimit`-style headers:
    /// day 86 400, week 604 800, month (anchored or not) 30 days = 2 592 000, year 365 days
    /// = 31 536 000, fixed its length, rolling `N × 86 400`. Real calendar windows vary
    /// (DST, month lengths); use [`PeriodSpec::window`] for exact bounds.
    pub fn nominal_seconds(&self) -> u64 {
        match self {
            PeriodSpec::Day => DAY_SECONDS,
            PeriodSpec::Week => 7 * DAY_SECONDS,
            PeriodSpec::Month | PeriodSpec::MonthAnchored { .. } => 30 * DAY_SECONDS,
            PeriodSpec::Year => 365 * DAY_SECONDS,
            PeriodSpec::Fixed { seconds } => *seconds,
            PeriodSpec::Rolling { days } => u64::from(*days) * DAY_SECONDS,
        }
    }

    /// The period containing `at`. Calendar periods follow `tz`; fixed and rolling windows
    /// ignore it. For a rolling window the result is `(at − N days, at]` (see the module
    /// docs); for all others `[start, end)` with `start <= at < end`.
    pub fn window(&self, at: DateTime<Utc>, tz: Tz) -> Window {
        match *self {
            PeriodSpec::Fixed { seconds } => fixed_window(at, seconds),
            PeriodSpec::Rolling { days } => Window { start: rolling_start(at, days), end: at },
            calendar => calendar_window(calendar, at, tz),
        }
    }

    /// The window that follows `w`, a window of this spec: it starts where `w` ends. For
    /// timers (period rollover). `None` for a rolling window, which does not roll over;
    /// use [`rolling_unblock_at`] instead.
    pub fn next(&self, w: &Window, tz: Tz) -> Option<Window> {
        match self {
            PeriodSpec::Rolling { .. } => None,
            _ => Some(self.window(w.end, tz)),
        }
    }

    /// The instant the period containing `at` ends (its reset time). For a rolling window,
    /// the instant usage made at `at` would leave it (`at + N days`).
    pub fn resets_at(&self, at: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        match *self {
            PeriodSpec::Rolling { days } => add_days_saturating(at, days),
            _ => self.window(at, tz).end,
        }
    }

    /// Whether usage at `t` counts in window `w` of this spec: `start <= t < end`, or for
    /// a rolling window `start < t <= end`.
    pub fn includes(&self, w: &Window, t: DateTime<Utc>) -> bool {
        match self {
            PeriodSpec::Rolling { .. } => w.start < t && t <= w.end,
            _ => w.contains(t),
        }
    }
}

fn fixed_window(at: DateTime<Utc>, seconds: u64) -> Window {
    let size = i64::try_from(seconds.max(1)).unwrap_or(i64::MAX);
    let start_secs = at.timestamp().div_euclid(size).saturating_mul(size);
    let start = DateTime::from_timestamp(start_secs, 0).unwrap_or(DateTime::<Utc>::MIN_UTC);
    let end = start.checked_add_signed(Duration::seconds(size)).unwrap_or(DateTime::<Utc>::MAX_UTC);
    Window { start, end }
}

fn rolling_start(at: DateTime<Utc>, days: u32) -> DateTime<Utc> {
    at.checked_sub_signed(Duration::days(i64::from(days))).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn add_days_saturating(at: DateTime<Utc>, days: u32) -> DateTime<Utc> {
    at.checked_add_signed(Duration::days(i64::from(days))).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The first day of the calendar period containing local date `d`.
fn period_start_date(spec: PeriodSpec, d: NaiveDate) -> Option<NaiveDate> {
    match spec {
        PeriodSpec::Day => Some(d),
        PeriodSpec::Week => d.checked_sub_days(Days::new(u64::from(d.weekday().num_days_from_monday()))),
        PeriodSpec::Month => d.with_day(1),
        PeriodSpec::Year => NaiveDate::from_ymd_opt(d.year(), 1, 1),
        PeriodSpec::MonthAnchored { day } => {
            let this = anchor_in_month(d.year(), d.month(), day)?;
            if d >= this {
                Some(this)
            } else {
                let prev = first_of_month(d)?.checked_sub_months(Months::new(1))?;
                anchor_in_month(prev.year(), prev.month(), day)
            }
        }
        PeriodSpec::Fixed { .. } | PeriodSpec::Rolling { .. } => None,
    }
}

/// The first day of the calendar period after the one starting on `start`.
fn next_start_date(spec: PeriodSpec, start: NaiveDate) -> Option<NaiveDate> {
    match spec {
        PeriodSpec::Day => start.checked_add_days(Days::new(1)),
        PeriodSpec::Week => start.checked_add_days(Days::new(7)),
        PeriodSpec::Month => start.checked_add_months(Months::new(1)),
        PeriodSpec::Year => start.checked_add_months(Months::new(12)),
        PeriodSpec::MonthAnchored { day } => {
            let next = first_of_month(start)?.checked_add_months(Months::new(1))?;
            anchor_in_month(next.year(), next.month(), day)
        }
        PeriodSpec::Fixed { .. } | PeriodSpec::Rolling { .. } => None,
    }
}

/// The first day of the calendar period before the one starting on `start`.
fn prev_start_date(spec: PeriodSpec, start: NaiveDate) -> Option<NaiveDate> {
    let day_before = start.checked_sub_days(Days::new(1))?;
    period_start_date(spec, day_before)
}

fn first_of_month(d: NaiveDate) -> Option<NaiveDate> {
    d.with_day(1)
}

/// Day `day` of the month, clamped to the month's last day.
fn anchor_in_month(year: i32, month: u32, day: u8) -> Option<NaiveDate> {
    let first = NaiveDate::from_ymd_opt(year, month, 1)?;
    let last = first.checked_add_months(Months::new(1))?.pred_opt()?;
    let day = u32::from(day.clamp(1, 31)).min(last.day());
    NaiveDate::from_ymd_opt(year, month, day)
}

/// The instant local date `d` begins in `tz`: its midnight, the first occurrence of an
/// ambiguous midnight, or the first instant after a gap that swallows midnight.
pub fn start_of_day(d: NaiveDate, tz: Tz) -> Option<DateTime<Utc>> {
    let midnight = d.and_time(NaiveTime::MIN);
    match tz.from_local_datetime(&midnight).earliest() {
        Some(t) => Some(t.with_timezone(&Utc)),
        None => first_instant_at_or_after(midnight, tz),
    }
}

/// The first instant whose local time in `tz` is at or after `local`, for a `local` that
/// falls in a gap. Local time is increasing around a gap, so a binary search over the
/// instants within 15 hours of `local` (every UTC offset is within ±14 h) finds the gap's
/// end to the second.
fn first_instant_at_or_after(local: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    let as_utc = local.and_utc().timestamp();
    // Past the ends of chrono's range (where the local time is out of it too), the latest
    // instants have reached `local` and the earliest have not.
    let reached = |secs: i64| match DateTime::from_timestamp(secs, 0) {
        Some(t) => local_time(t, tz).map_or(secs > 0, |l| l >= local),
        None => secs > 0,
    };
    let (mut lo, mut hi) = (as_utc - 15 * 3_600, as_utc + 15 * 3_600);
    if reached(lo) || !reached(hi) {
        return None;
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if reached(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    DateTime::from_timestamp(hi, 0)
}

/// The local time of `at` in `tz`; `None` within a day of the ends of chrono's range, where
/// it is out of the range (`DateTime::naive_local` panics there).
fn local_time(at: DateTime<Utc>, tz: Tz) -> Option<NaiveDateTime> {
    at.naive_utc().checked_add_offset(tz.offset_from_utc_datetime(&at.naive_utc()).fix())
}

fn calendar_window(spec: PeriodSpec, at: DateTime<Utc>, tz: Tz) -> Window {
    let mut start_date = local_time(at, tz).and_then(|local| period_start_date(spec, local.date()));
    // The local date of `at` names the right period except in the hour a clock turns back
    // across midnight; then `at` belongs to the neighbouring period. One step each way
    // suffices; the bound keeps this total.
    for _ in 0..4 {
        let Some(date) = start_date else { break };
        let start = start_of_day(date, tz).unwrap_or(DateTime::<Utc>::MIN_UTC);
        if at < start {
            start_date = prev_start_date(spec, date);
            continue;
        }
        let end = next_start_date(spec, date).and_then(|next| start_of_day(next, tz)).unwrap_or(DateTime::<Utc>::MAX_UTC);
        if at >= end {
            start_date = next_start_date(spec, date);
            continue;
        }
        return Window { start, end };
    }
    // Only reachable at the ends of chrono's date range.
    Window { start: DateTime::<Utc>::MIN_UTC, end: DateTime::<Utc>::MAX_UTC }
}

/// Seconds of a rolling window's bucket per day of the window: a window of `N` days keeps
/// its usage in buckets of `N` minutes.
pub const ROLLING_BUCKET_SECONDS_PER_DAY: u64 = 60;
/// How many buckets one rolling window spans, whatever its length (`N` days of `N`-minute
/// buckets). A rolling key holds at most one more than this with usage that has not left.
pub const ROLLING_BUCKETS_PER_WINDOW: u64 = DAY_SECONDS / ROLLING_BUCKET_SECONDS_PER_DAY;

/// The length of one bucket of a rolling window of `days`: `days` minutes (1440 buckets per
/// window). A `days` of 0, which no spec holds, is taken as 1.
pub fn rolling_bucket_seconds(days: u32) -> u64 {
    u64::from(days.max(1)) * ROLLING_BUCKET_SECONDS_PER_DAY
}

/// The bucket that usage at `at` is counted in for a rolling window of `days`: the
/// half-open window of [`rolling_bucket_seconds`] that contains `at`, aligned to the UTC
/// epoch (as fixed windows are).
pub fn rolling_bucket(at: DateTime<Utc>, days: u32) -> Window {
    fixed_window(at, rolling_bucket_seconds(days))
}

/// Usage of a rolling window summed over a span of time: `used` made at instants in
/// `[start, end)`, or exactly at `start` when `start == end` (one event, counted exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollingBucket {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub used: i64,
}

impl RollingBucket {
    /// The usage of a single instant `t`: the per-event rule, with no rounding.
    pub fn instant(t: DateTime<Utc>, used: i64) -> RollingBucket {
        RollingBucket { start: t, end: t, used }
    }

    /// When the bucket's usage leaves a window of `days`: `end + days`, when the latest
    /// usage it may hold has left, never before.
    pub fn leaves_at(&self, days: u32) -> DateTime<Utc> {
        add_days_saturating(self.end, days)
    }

    /// Whether the bucket's usage counts in a window of `days` at `at`: from its `start`
    /// (the earliest it may have entered) until [`RollingBucket::leaves_at`], exclusive.
    pub fn counts_at(&self, days: u32, at: DateTime<Utc>) -> bool {
        self.start <= at && at < self.leaves_at(days)
    }
}

/// The usage counted in a rolling window of `days` at `at`: the sum of the buckets that
/// [count](RollingBucket::counts_at) then. For buckets of single instants this is the
/// per-event rule, amounts with `at − days < time <= at`.
pub fn rolling_used(buckets: &[RollingBucket], days: u32, at: DateTime<Utc>) -> i64 {
    buckets.iter().filter(|b| b.counts_at(days, at)).fold(0i64, |sum, b| sum.saturating_add(b.used))
}

/// When a subject breached on a rolling window becomes allowed again.
///
/// Breached means `used >= limit + burst`, as in [`crate::decision::quota_state`], where
/// `used` is [`rolling_used`]. Returns `None` when the subject is not breached at `now`;
/// otherwise the earliest instant `u >= now` at which it is no longer breached, taking
/// into account buckets leaving the window (at [`RollingBucket::leaves_at`]) and buckets
/// dated after `now` entering it (at their start). A limit that nothing can satisfy
/// (`limit + burst <= 0`) gives `Some(DateTime::<Utc>::MAX_UTC)`: never.
///
/// With buckets of single instants the answer is exact to the event. With the buckets of
/// [`rolling_bucket`] and usage that is not negative it is never earlier than that, and
/// when no usage is dated after `now`, at most one bucket later.
pub fn rolling_unblock_at(buckets: &[RollingBucket], limit: i64, burst: i64, days: u32, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let cap = limit.saturating_add(burst);
    let mut used = rolling_used(buckets, days, now);
    if used < cap {
        return None;
    }
    // Changes to `used` after `now`: buckets leaving and entering.
    let mut changes: Vec<(DateTime<Utc>, i64)> = Vec::new();
    for bucket in buckets {
        let leaves = bucket.leaves_at(days);
        if leaves > now {
            changes.push((leaves, bucket.used.saturating_neg()));
        }
        if bucket.start > now {
            changes.push((bucket.start, bucket.used));
        }
    }
    changes.sort();
    let mut i = 0;
    while i < changes.len() {
        let instant = changes[i].0;
        while i < changes.len() && changes[i].0 == instant {
            used = used.saturating_add(changes[i].1);
            i += 1;
        }
        if used < cap {
            return Some(instant);
        }
    }
    Some(DateTime::<Utc>::MAX_UTC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono_tz::Tz;
    use proptest::prelude::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn tz(name: &str) -> Tz {
        name.parse().unwrap()
    }

    fn win(spec: &str, at: &str, zone: &str) -> (String, String) {
        let w = spec.parse::<PeriodSpec>().unwrap().window(utc(at), tz(zone));
        (w.start.to_rfc3339(), w.end.to_rfc3339())
    }

    #[test]
    fn parses_the_grammar() {
        let cases: &[(&str, PeriodSpec)] = &[
            ("day", PeriodSpec::Day),
            ("d", PeriodSpec::Day),
            ("week", PeriodSpec::Week),
            ("w", PeriodSpec::Week),
            ("month", PeriodSpec::Month),
            ("mo", PeriodSpec::Month),
            ("year", PeriodSpec::Year),
            ("month@15", PeriodSpec::MonthAnchored { day: 15 }),
            ("month@31", PeriodSpec::MonthAnchored { day: 31 }),
            ("minute", PeriodSpec::Fixed { seconds: 60 }),
            ("m", PeriodSpec::Fixed { seconds: 60 }),
            ("hour", PeriodSpec::Fixed { seconds: 3_600 }),
            ("30s", PeriodSpec::Fixed { seconds: 30 }),
            ("5m", PeriodSpec::Fixed { seconds: 300 }),
            ("5 min", PeriodSpec::Fixed { seconds: 300 }),
            ("2h", PeriodSpec::Fixed { seconds: 7_200 }),
            ("1d", PeriodSpec::Fixed { seconds: 86_400 }),
            ("7 days", PeriodSpec::Fixed { seconds: 7 * 86_400 }),
            ("rolling 7d", PeriodSpec::Rolling { days: 7 }),
            ("rolling 30 days", PeriodSpec::Rolling { days: 30 }),
            ("7 days rolling", PeriodSpec::Rolling { days: 7 }),
            ("7d rolling", PeriodSpec::Rolling { days: 7 }),
            ("  day  ", PeriodSpec::Day),
        ];
        for (text, spec) in cases {
            assert_eq!(text.parse::<PeriodSpec>().as_ref(), Ok(spec), "parsing {text:?}");
        }
    }

    #[test]
    fn rejects_with_the_reason() {
        type Check = fn(&PeriodError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, PeriodError::Empty)),
            ("fortnight", |e| matches!(e, PeriodError::UnknownUnit { unit, .. } if unit == "fortnight")),
            ("30", |e| matches!(e, PeriodError::MissingUnit { .. })),
            ("0s", |e| matches!(e, PeriodError::ZeroWindow { .. })),
            ("-5m", |e| matches!(e, PeriodError::NegativeWindow { .. })),
            ("5m30s", |e| matches!(e, PeriodError::TrailingGarbage { garbage, .. } if garbage == "30s")),
            ("day!", |e| matches!(e, PeriodError::TrailingGarbage { .. })),
            ("2 months", |e| matches!(e, PeriodError::CountOnCalendarUnit { .. })),
            ("1w", |e| matches!(e, PeriodError::CountOnCalendarUnit { .. })),
            ("month@0", |e| matches!(e, PeriodError::BadAnchorDay { .. })),
            ("month@32", |e| matches!(e, PeriodError::BadAnchorDay { .. })),
            ("month@x", |e| matches!(e, PeriodError::BadAnchorDay { .. })),
            ("week@3", |e| matches!(e, PeriodError::UnknownUnit { .. })),
            ("rolling", |e| matches!(e, PeriodError::MissingNumber { .. })),
            ("rolling 0d", |e| matches!(e, PeriodError::ZeroWindow { .. })),
            ("rolling 5h", |e| matches!(e, PeriodError::RollingUnit { .. })),
            ("367d", |e| matches!(e, PeriodError::TooLong { .. })),
            ("99999999999999999999999s", |e| matches!(e, PeriodError::TooLong { .. })),
            ("Day", |e| matches!(e, PeriodError::UnknownUnit { .. })),
            ("+5m", |e| matches!(e, PeriodError::Unexpected { .. })),
        ];
        for (text, check) in cases {
            let err = text.parse::<PeriodSpec>().expect_err(text);
            assert!(check(&err), "{text:?} gave {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn display_is_canonical() {
        let cases = [
            ("minute", "1m"),
            ("90s", "90s"),
            ("120s", "2m"),
            ("24h", "1d"),
            ("day", "day"),
            ("month@15", "month@15"),
            ("7 days rolling", "rolling 7d"),
        ];
        for (text, shown) in cases {
            assert_eq!(text.parse::<PeriodSpec>().unwrap().to_string(), shown);
        }
    }

    #[test]
    fn calendar_windows_in_utc() {
        let cases = [
            ("day", "2026-03-15T13:45:00Z", "2026-03-15T00:00:00+00:00", "2026-03-16T00:00:00+00:00"),
            // 2026-03-15 is a Sunday: its week began Monday 9 March.
            ("week", "2026-03-15T23:59:59Z", "2026-03-09T00:00:00+00:00", "2026-03-16T00:00:00+00:00"),
            ("week", "2026-03-16T00:00:00Z", "2026-03-16T00:00:00+00:00", "2026-03-23T00:00:00+00:00"),
            ("month", "2026-02-28T12:00:00Z", "2026-02-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"),
            ("month", "2028-02-29T12:00:00Z", "2028-02-01T00:00:00+00:00", "2028-03-01T00:00:00+00:00"),
            ("month", "2026-12-31T23:59:59Z", "2026-12-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
            ("year", "2028-12-31T23:59:59Z", "2028-01-01T00:00:00+00:00", "2029-01-01T00:00:00+00:00"),
            ("year", "2027-01-01T00:00:00Z", "2027-01-01T00:00:00+00:00", "2028-01-01T00:00:00+00:00"),
        ];
        for (spec, at, start, end) in cases {
            assert_eq!(win(spec, at, "UTC"), (start.to_string(), end.to_string()), "{spec} at {at}");
        }
    }

    #[test]
    fn anchored_months_clamp_to_the_last_day() {
        let cases = [
            ("month@15", "2026-03-15T00:00:00Z", "2026-03-15T00:00:00+00:00", "2026-04-15T00:00:00+00:00"),
            ("month@15", "2026-03-14T23:59:59Z", "2026-02-15T00:00:00+00:00", "2026-03-15T00:00:00+00:00"),
            // Day 31: February's anchor is the 28th (29th in a leap year), April's the 30th.
            ("month@31", "2026-02-28T00:00:00Z", "2026-02-28T00:00:00+00:00", "2026-03-31T00:00:00+00:00"),
            ("month@31", "2026-02-27T10:00:00Z", "2026-01-31T00:00:00+00:00", "2026-02-28T00:00:00+00:00"),
            ("month@31", "2028-02-28T10:00:00Z", "2028-01-31T00:00:00+00:00", "2028-02-29T00:00:00+00:00"),
            ("month@31", "2026-04-30T10:00:00Z", "2026-04-30T00:00:00+00:00", "2026-05-31T00:00:00+00:00"),
            ("month@30", "2026-03-01T00:00:00Z", "2026-02-28T00:00:00+00:00", "2026-03-30T00:00:00+00:00"),
            ("month@29", "2028-02-29T00:00:00Z", "2028-02-29T00:00:00+00:00", "2028-03-29T00:00:00+00:00"),
            // Year end.
            ("month@20", "2027-01-05T00:00:00Z", "2026-12-20T00:00:00+00:00", "2027-01-20T00:00:00+00:00"),
            ("month@1", "2026-07-09T00:00:00Z", "2026-07-01T00:00:00+00:00", "2026-08-01T00:00:00+00:00"),
        ];
        for (spec, at, start, end) in cases {
            assert_eq!(win(spec, at, "UTC"), (start.to_string(), end.to_string()), "{spec} at {at}");
        }
    }

    #[test]
    fn calendar_windows_follow_the_timezone() {
        let cases = [
            // 23:30 UTC on the 14th is already the 15th in Tokyo.
            ("day", "2026-03-14T23:30:00Z", "Asia/Tokyo", "2026-03-14T15:00:00+00:00", "2026-03-15T15:00:00+00:00"),
            ("month", "2026-01-31T20:00:00Z", "Asia/Kolkata", "2026-01-31T18:30:00+00:00", "2026-02-28T18:30:00+00:00"),
            ("year", "2026-12-31T23:00:00Z", "Pacific/Kiritimati", "2026-12-31T10:00:00+00:00", "2027-12-31T10:00:00+00:00"),
            ("month@15", "2026-03-15T03:00:00Z", "America/New_York", "2026-02-15T05:00:00+00:00", "2026-03-15T04:00:00+00:00"),
        ];
        for (spec, at, zone, start, end) in cases {
            assert_eq!(win(spec, at, zone), (start.to_string(), end.to_string()), "{spec} at {at} in {zone}");
        }
    }

    #[test]
    fn dst_days_are_23_or_25_hours() {
        // (zone, local date of a transition day, at, start, end, hours)
        let cases = [
            // Los Angeles springs forward 2026-03-08 02:00 -> 03:00 and falls back 2026-11-01.
            ("America/Los_Angeles", "2026-03-08T12:00:00Z", "2026-03-08T08:00:00+00:00", "2026-03-09T07:00:00+00:00", 23),
            ("America/Los_Angeles", "2026-11-01T12:00:00Z", "2026-11-01T07:00:00+00:00", "2026-11-02T08:00:00+00:00", 25),
            // London: 2026-03-29 01:00 GMT -> 02:00 BST; 2026-10-25 02:00 BST -> 01:00 GMT.
            ("Europe/London", "2026-03-29T12:00:00Z", "2026-03-29T00:00:00+00:00", "2026-03-29T23:00:00+00:00", 23),
            ("Europe/London", "2026-10-25T12:00:00Z", "2026-10-24T23:00:00+00:00", "2026-10-26T00:00:00+00:00", 25),
            // Lord Howe shifts by 30 minutes: +10:30 <-> +11 (2026-04-05 and 2026-10-04).
            ("Australia/Lord_Howe", "2026-04-05T05:00:00Z", "2026-04-04T13:00:00+00:00", "2026-04-05T13:30:00+00:00", 0),
            ("Australia/Lord_Howe", "2026-10-04T05:00:00Z", "2026-10-03T13:30:00+00:00", "2026-10-04T13:00:00+00:00", 0),
        ];
        for (zone, at, start, end, hours) in cases {
            let w = PeriodSpec::Day.window(utc(at), tz(zone));
            assert_eq!((w.start.to_rfc3339(), w.end.to_rfc3339()), (start.to_string(), end.to_string()), "{zone} {at}");
            if hours != 0 {
                assert_eq!(w.duration(), Duration::hours(hours), "{zone} {at}");
            }
        }
        let lord_howe_long = PeriodSpec::Day.window(utc("2026-04-05T05:00:00Z"), tz("Australia/Lord_Howe"));
        assert_eq!(lord_howe_long.duration(), Duration::minutes(24 * 60 + 30));
        let lord_howe_short = PeriodSpec::Day.window(utc("2026-10-04T05:00:00Z"), tz("Australia/Lord_Howe"));
        assert_eq!(lord_howe_short.duration(), Duration::minutes(23 * 60 + 30));
    }

    #[test]
    fn santiago_missing_midnight_starts_after_the_gap() {
        let santiago = tz("America/Santiago");
        // Chile springs forward at local midnight on 2026-09-06: 00:00 -04 becomes 01:00 -03.
        let midnight = NaiveDate::from_ymd_opt(2026, 9, 6).unwrap().and_time(NaiveTime::MIN);
        assert!(santiago.from_local_datetime(&midnight).earliest().is_none(), "midnight must not exist");
        let w = PeriodSpec::Day.window(utc("2026-09-06T12:00:00Z"), santiago);
        assert_eq!(w.start, utc("2026-09-06T04:00:00Z")); // 01:00 -03, the first instant after the gap
        assert_eq!(w.end, utc("2026-09-07T03:00:00Z"));
        assert_eq!(w.duration(), Duration::hours(23));
        // The instant before the gap still belongs to the 5th.
        let before = PeriodSpec::Day.window(utc("2026-09-06T03:59:59Z"), santiago);
        assert_eq!(before.end, w.start);
        assert_eq!(before.start, utc("2026-09-05T04:00:00Z"));
        // The week and month containing that Sunday start/end at the same shifted instant.
        let week = PeriodSpec::Week.window(utc("2026-09-07T12:00:00Z"), santiago);
        assert_eq!(week.start, utc("2026-09-07T03:00:00Z"));
        let week_before = PeriodSpec::Week.window(utc("2026-09-06T12:00:00Z"), santiago);
        assert_eq!(week_before.start, utc("2026-08-31T04:00:00Z"));
        assert_eq!(week_before.end, week.start);
    }

    #[test]
    fn santiago_fall_back_repeats_the_last_hour_of_saturday() {
        let santiago = tz("America/Santiago");
        // Chile falls back at 24:00 on 2026-04-04: 00:00 -03 becomes 23:00 -04, so the
        // Saturday lasts 25 hours and midnight of the 5th happens once.
        let midnight = NaiveDate::from_ymd_opt(2026, 4, 5).unwrap().and_time(NaiveTime::MIN);
        assert!(matches!(santiago.from_local_datetime(&midnight), chrono::LocalResult::Single(_)));
        let saturday = PeriodSpec::Day.window(utc("2026-04-05T03:30:00Z"), santiago);
        assert_eq!(saturday.start, utc("2026-04-04T03:00:00Z"));
        assert_eq!(saturday.end, utc("2026-04-05T04:00:00Z"));
        assert_eq!(saturday.duration(), Duration::hours(25));
        let sunday = PeriodSpec::Day.window(utc("2026-04-05T04:00:00Z"), santiago);
        assert_eq!(sunday.start, saturday.end);
        assert_eq!(sunday.duration(), Duration::hours(24));
    }

    #[test]
    fn havana_ambiguous_midnight_starts_at_its_first_occurrence() {
        let havana = tz("America/Havana");
        // Cuba falls back at 01:00 CDT on 2026-11-01 to 00:00 CST: midnight happens twice.
        let midnight = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap().and_time(NaiveTime::MIN);
        assert!(matches!(havana.from_local_datetime(&midnight), chrono::LocalResult::Ambiguous(..)));
        let sunday = PeriodSpec::Day.window(utc("2026-11-01T12:00:00Z"), havana);
        assert_eq!(sunday.start, utc("2026-11-01T04:00:00Z"));
        assert_eq!(sunday.end, utc("2026-11-02T05:00:00Z"));
        assert_eq!(sunday.duration(), Duration::hours(25));
        // The second midnight (05:00Z) is inside the day, not the start of another.
        assert_eq!(PeriodSpec::Day.window(utc("2026-11-01T05:00:00Z"), havana), sunday);
        assert_eq!(PeriodSpec::Day.window(utc("2026-11-01T03:59:59Z"), havana).end, sunday.start);
        // Cuba springs forward at midnight on 2026-03-08: the day starts at 01:00 CDT.
        let spring = PeriodSpec::Day.window(utc("2026-03-08T12:00:00Z"), havana);
        assert_eq!(spring.start, utc("2026-03-08T05:00:00Z"));
        assert_eq!(spring.duration(), Duration::hours(23));
    }

    #[test]
    fn fixed_windows_align_to_the_epoch_and_ignore_the_timezone() {
        let cases = [
            ("minute", "2026-03-08T10:15:42Z", "2026-03-08T10:15:00+00:00", "2026-03-08T10:16:00+00:00"),
            ("30s", "2026-03-08T10:15:42Z", "2026-03-08T10:15:30+00:00", "2026-03-08T10:16:00+00:00"),
            ("hour", "2026-03-08T10:59:59Z", "2026-03-08T10:00:00+00:00", "2026-03-08T11:00:00+00:00"),
            ("7h", "1970-01-01T07:00:00Z", "1970-01-01T07:00:00+00:00", "1970-01-01T14:00:00+00:00"),
            ("1d", "2026-03-08T10:15:42Z", "2026-03-08T00:00:00+00:00", "2026-03-09T00:00:00+00:00"),
            ("1h", "1969-12-31T23:30:00Z", "1969-12-31T23:00:00+00:00", "1970-01-01T00:00:00+00:00"),
        ];
        for (spec, at, start, end) in cases {
            assert_eq!(win(spec, at, "Australia/Lord_Howe"), (start.to_string(), end.to_string()), "{spec} at {at}");
        }
    }

    #[test]
    fn rolling_window_is_open_closed() {
        let spec = PeriodSpec::Rolling { days: 7 };
        let at = utc("2026-03-08T10:00:00Z");
        let w = spec.window(at, tz("America/Los_Angeles"));
        assert_eq!(w.start, utc("2026-03-01T10:00:00Z"));
        assert_eq!(w.end, at);
        assert!(spec.includes(&w, at));
        assert!(!spec.includes(&w, w.start));
        assert!(spec.includes(&w, w.start + Duration::seconds(1)));
        assert_eq!(spec.next(&w, tz("UTC")), None);
        assert_eq!(spec.resets_at(at, tz("UTC")), utc("2026-03-15T10:00:00Z"));
    }

    #[test]
    fn next_window_starts_where_the_last_ended() {
        let la = tz("America/Los_Angeles");
        let w = PeriodSpec::Month.window(utc("2026-02-10T00:00:00Z"), la);
        let n = PeriodSpec::Month.next(&w, la).unwrap();
        assert_eq!(n.start, w.end);
        assert_eq!(n.start, utc("2026-03-01T08:00:00Z"));
        assert_eq!(n.end, utc("2026-04-01T07:00:00Z"));
        let f = PeriodSpec::Fixed { seconds: 60 };
        let w = f.window(utc("2026-02-10T00:00:30Z"), la);
        assert_eq!(f.next(&w, la).unwrap().start, utc("2026-02-10T00:01:00Z"));
    }

    /// Buckets of single instants: the per-event rule.
    fn instants(usage: &[(DateTime<Utc>, i64)]) -> Vec<RollingBucket> {
        usage.iter().map(|&(t, used)| RollingBucket::instant(t, used)).collect()
    }

    /// Usage summed in the buckets of [`rolling_bucket`], as the ledger stores it.
    fn bucketed(usage: &[(DateTime<Utc>, i64)], days: u32) -> Vec<RollingBucket> {
        let mut buckets: Vec<RollingBucket> = Vec::new();
        for &(t, used) in usage {
            let w = rolling_bucket(t, days);
            match buckets.iter_mut().find(|b| b.start == w.start) {
                Some(b) => b.used += used,
                None => buckets.push(RollingBucket { start: w.start, end: w.end, used }),
            }
        }
        buckets
    }

    #[test]
    fn rolling_buckets_are_n_minutes_for_n_days() {
        assert_eq!(rolling_bucket_seconds(1), 60);
        assert_eq!(rolling_bucket_seconds(30), 1_800);
        assert_eq!(rolling_bucket_seconds(366), 21_960);
        assert_eq!(ROLLING_BUCKETS_PER_WINDOW, 1_440);
        let w = rolling_bucket(utc("2026-03-01T10:17:42Z"), 30);
        assert_eq!((w.start, w.end), (utc("2026-03-01T10:00:00Z"), utc("2026-03-01T10:30:00Z")));
        let w = rolling_bucket(utc("2026-03-01T10:00:00Z"), 1);
        assert_eq!((w.start, w.end), (utc("2026-03-01T10:00:00Z"), utc("2026-03-01T10:01:00Z")));
        // Seven-minute buckets follow the epoch, not the day.
        let w = rolling_bucket(utc("2026-03-01T00:00:00Z"), 7);
        assert_eq!(w.start.timestamp() % 420, 0);
        assert!(w.start < utc("2026-03-01T00:00:00Z"));
    }

    #[test]
    fn a_bucket_counts_from_its_start_until_its_end_plus_the_window() {
        let b = RollingBucket { start: utc("2026-03-01T10:00:00Z"), end: utc("2026-03-01T10:01:00Z"), used: 5 };
        assert_eq!(b.leaves_at(1), utc("2026-03-02T10:01:00Z"));
        assert!(!b.counts_at(1, utc("2026-03-01T09:59:59Z")));
        assert!(b.counts_at(1, utc("2026-03-01T10:00:00Z")));
        assert!(b.counts_at(1, utc("2026-03-02T10:00:59Z")));
        assert!(!b.counts_at(1, utc("2026-03-02T10:01:00Z")));
        let one = RollingBucket::instant(utc("2026-03-01T10:00:30Z"), 5);
        assert!(one.counts_at(1, utc("2026-03-02T10:00:29Z")));
        assert!(!one.counts_at(1, utc("2026-03-02T10:00:30Z")));
    }

    #[test]
    fn rolling_unblock_waits_for_the_end_of_the_breaching_bucket() {
        let t = |s: &str| utc(s);
        let usage = [(t("2026-03-01T10:00:30Z"), 80), (t("2026-03-01T20:00:00Z"), 30)];
        let now = t("2026-03-02T00:00:00Z");
        // Exactly, the 80 leaves at 10:00:30 the next day; its one-minute bucket ends at 10:01.
        assert_eq!(rolling_unblock_at(&instants(&usage), 100, 0, 1, now), Some(t("2026-03-02T10:00:30Z")));
        assert_eq!(rolling_unblock_at(&bucketed(&usage, 1), 100, 0, 1, now), Some(t("2026-03-02T10:01:00Z")));
        assert_eq!(rolling_used(&bucketed(&usage, 1), 1, t("2026-03-02T10:00:59Z")), 110);
        assert_eq!(rolling_used(&bucketed(&usage, 1), 1, t("2026-03-02T10:01:00Z")), 30);
        // A one-second row of an older version counts until its own end plus the window.
        let old_row = [RollingBucket { start: t("2026-03-01T10:00:30Z"), end: t("2026-03-01T10:00:31Z"), used: 80 }];
        assert_eq!(rolling_unblock_at(&old_row, 50, 0, 1, now), Some(t("2026-03-02T10:00:31Z")));
    }

    #[test]
    fn rolling_unblock_is_when_the_breaching_usage_leaves() {
        let t = |s: &str| utc(s);
        let usage = instants(&[(t("2026-03-01T10:00:00Z"), 60), (t("2026-03-03T10:00:00Z"), 50)]);
        // Used 110 >= 100 on the 5th; after the first entry leaves (1st + 7d) used is 50.
        assert_eq!(rolling_unblock_at(&usage, 100, 0, 7, t("2026-03-05T00:00:00Z")), Some(t("2026-03-08T10:00:00Z")));
        // Not breached: none.
        assert_eq!(rolling_unblock_at(&usage, 200, 0, 7, t("2026-03-05T00:00:00Z")), None);
        // With burst 10 the cap is 110: still breached at 110.
        assert_eq!(rolling_unblock_at(&usage, 100, 10, 7, t("2026-03-05T00:00:00Z")), Some(t("2026-03-08T10:00:00Z")));
        // A limit of 60: after the first leaves, 50 < 60.
        assert_eq!(rolling_unblock_at(&usage, 60, 0, 7, t("2026-03-05T00:00:00Z")), Some(t("2026-03-08T10:00:00Z")));
        // A limit of 50: both must leave.
        assert_eq!(rolling_unblock_at(&usage, 50, 0, 7, t("2026-03-05T00:00:00Z")), Some(t("2026-03-10T10:00:00Z")));
        // Exactly at the leave instant the subject is allowed: nothing to wait for.
        assert_eq!(rolling_unblock_at(&usage, 60, 0, 7, t("2026-03-08T10:00:00Z")), None);
        // A zero limit never unblocks.
        assert_eq!(rolling_unblock_at(&[], 0, 0, 7, t("2026-03-05T00:00:00Z")), Some(DateTime::<Utc>::MAX_UTC));
    }

    #[test]
    fn rolling_unblock_counts_future_usage_and_corrections() {
        let t = |s: &str| utc(s);
        let usage = instants(&[
            (t("2026-03-01T10:00:00Z"), 100),
            // A future-dated event enters before the first leaves and keeps it breached.
            (t("2026-03-05T00:03:00Z"), 100),
        ]);
        assert_eq!(rolling_unblock_at(&usage, 100, 0, 7, t("2026-03-05T00:00:00Z")), Some(t("2026-03-12T00:03:00Z")));
        let corrected = instants(&[(t("2026-03-01T10:00:00Z"), 100), (t("2026-03-05T00:03:00Z"), -100)]);
        assert_eq!(rolling_unblock_at(&corrected, 100, 0, 7, t("2026-03-05T00:00:00Z")), Some(t("2026-03-05T00:03:00Z")));
    }

    const ZONES: &[&str] = &[
        "UTC",
        "America/Los_Angeles",
        "Europe/London",
        "Australia/Lord_Howe",
        "America/Santiago",
        "America/Havana",
        "Asia/Kolkata",
        "Pacific/Chatham",
        "America/St_Johns",
    ];

    #[test]
    fn windows_at_the_ends_of_chronos_range_do_not_panic() {
        // Near the ends, a local time west or east of UTC is out of chrono's range.
        let specs = [PeriodSpec::Day, PeriodSpec::Week, PeriodSpec::Month, PeriodSpec::MonthAnchored { day: 31 }, PeriodSpec::Year];
        for zone in ["America/Santiago", "Pacific/Chatham", "UTC"] {
            let tz: Tz = zone.parse().unwrap();
            for at in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MIN_UTC + Duration::hours(30), DateTime::<Utc>::MAX_UTC] {
                for spec in specs {
                    let w = spec.window(at, tz);
                    assert!(w.start <= at && at <= w.end, "{spec} at {at} in {zone}: {w:?}");
                    let _ = spec.resets_at(at, tz);
                }
            }
        }
    }

    fn any_spec() -> impl Strategy<Value = PeriodSpec> {
        prop_oneof![
            Just(PeriodSpec::Day),
            Just(PeriodSpec::Week),
            Just(PeriodSpec::Month),
            Just(PeriodSpec::Year),
            (1u8..=31).prop_map(|day| PeriodSpec::MonthAnchored { day }),
            (1u64..=MAX_WINDOW_DAYS * DAY_SECONDS).prop_map(|seconds| PeriodSpec::Fixed { seconds }),
            (1u32..=366).prop_map(|days| PeriodSpec::Rolling { days }),
        ]
    }

    fn tiling_spec() -> impl Strategy<Value = PeriodSpec> {
        any_spec().prop_filter("tiles", |s| s.tiles())
    }

    // 1950..2100
    fn any_instant() -> impl Strategy<Value = DateTime<Utc>> {
        (-631_152_000i64..4_102_444_800i64).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap())
    }

    fn any_zone() -> impl Strategy<Value = Tz> {
        proptest::sample::select(ZONES).prop_map(|z| z.parse::<Tz>().unwrap())
    }

    proptest! {
        #[test]
        fn display_round_trips(spec in any_spec()) {
            prop_assert_eq!(spec.to_string().parse::<PeriodSpec>(), Ok(spec));
        }

        #[test]
        fn every_instant_lies_in_its_window(spec in tiling_spec(), at in any_instant(), zone in any_zone()) {
            let w = spec.window(at, zone);
            prop_assert!(w.start <= at && at < w.end, "{spec} {at} {w:?}");
            // Every instant of the window maps to the same window.
            prop_assert_eq!(spec.window(w.start, zone), w);
            prop_assert_eq!(spec.window(w.end - Duration::seconds(1), zone), w);
        }

        #[test]
        fn consecutive_windows_tile_time(spec in tiling_spec(), at in any_instant(), zone in any_zone()) {
            let mut w = spec.window(at, zone);
            for _ in 0..3 {
                let next = spec.next(&w, zone).unwrap();
                prop_assert_eq!(next.start, w.end, "gap or overlap after {:?}", w);
                prop_assert!(next.end > next.start);
                // The instant before a boundary is in the earlier window, the boundary in the later.
                prop_assert_eq!(spec.window(next.start - Duration::seconds(1), zone), w);
                w = next;
            }
        }

        #[test]
        fn calendar_windows_start_at_or_just_after_local_midnight(spec in tiling_spec().prop_filter("calendar", |s| s.is_calendar()), at in any_instant(), zone in any_zone()) {
            let w = spec.window(at, zone);
            let local = w.start.with_timezone(&zone).naive_local();
            // Midnight, or the end of a gap of at most an hour (or a repeated-midnight day).
            let since_midnight = local.time().signed_duration_since(NaiveTime::MIN);
            prop_assert!(since_midnight <= Duration::hours(1) || since_midnight >= Duration::hours(23), "{spec} {at} {w:?} local {local}");
        }

        #[test]
        fn rolling_unblock_instant_is_exact(
            amounts in proptest::collection::vec((0i64..20 * 86_400, 0i64..50), 0..12),
            limit in 1i64..200,
            days in 1u32..10,
            now_offset in 0i64..20 * 86_400,
        ) {
            let base = utc("2026-01-01T00:00:00Z");
            let usage = instants(&amounts.iter().map(|(s, a)| (base + Duration::seconds(*s), *a)).collect::<Vec<_>>());
            let now = base + Duration::seconds(now_offset);
            match rolling_unblock_at(&usage, limit, 0, days, now) {
                None => prop_assert!(rolling_used(&usage, days, now) < limit),
                Some(u) => {
                    prop_assert!(u >= now);
                    prop_assert!(rolling_used(&usage, days, u) < limit);
                    if u > now {
                        prop_assert!(rolling_used(&usage, days, u - Duration::seconds(1)) >= limit);
                    }
                }
            }
        }

        #[test]
        fn a_rolling_bucket_holds_its_instant_and_a_window_spans_1440(at in any_instant(), days in 1u32..=366) {
            let w = rolling_bucket(at, days);
            let length = i64::try_from(rolling_bucket_seconds(days)).unwrap();
            prop_assert!(w.start <= at && at < w.end);
            prop_assert_eq!(w.duration(), Duration::seconds(length));
            prop_assert_eq!(w.start.timestamp().rem_euclid(length), 0);
            prop_assert_eq!(i64::from(days) * 86_400 / length, 1_440);
        }

        #[test]
        fn bucketed_usage_unblocks_never_early_and_at_most_one_bucket_late(
            amounts in proptest::collection::vec((0i64..6 * 86_400, 0i64..50), 0..16),
            limit in 1i64..200,
            days in 1u32..4,
            now_offset in 0i64..6 * 86_400,
        ) {
            let base = utc("2026-01-01T00:00:00Z");
            let now = base + Duration::seconds(now_offset);
            let usage: Vec<_> = amounts.iter().map(|(s, a)| (base + Duration::seconds(*s), *a)).collect();
            let exact = rolling_unblock_at(&instants(&usage), limit, 0, days, now);
            let rounded = rolling_unblock_at(&bucketed(&usage, days), limit, 0, days, now);
            let bucket = Duration::seconds(i64::try_from(rolling_bucket_seconds(days)).unwrap());
            let nothing_in_the_future = usage.iter().all(|(t, _)| *t <= now);
            // Never allowed while the exact rule still blocks.
            prop_assert!(rolling_used(&bucketed(&usage, days), days, now) >= rolling_used(&instants(&usage), days, now));
            match (exact, rounded) {
                (Some(e), Some(r)) => {
                    prop_assert!(r >= e, "bucketed {r} before exact {e}");
                    if nothing_in_the_future {
                        prop_assert!(r <= e + bucket, "bucketed {r} more than a bucket after exact {e}");
                    }
                }
                (Some(e), None) => prop_assert!(false, "allowed at {now} though the exact rule blocks until {e}"),
                (None, Some(r)) => {
                    if nothing_in_the_future {
                        prop_assert!(r <= now + bucket, "bucketed {r} more than a bucket after {now}");
                    }
                }
                (None, None) => {}
            }
        }
    }
}
