//! Tier configurations several test modules use, so a test names the shape it needs.

/// One tier, `metered`, with a monthly token quota far above anything a test sends: every
/// event is counted and nobody is blocked.
pub const METERED: &str = "
default_tier: metered
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 1000000000000
tiers:
  - name: metered
    priority: 0
    rate_multiplier: 1
";

/// One tier, `basic`, with 1000 tokens a month and decisions at 80 % and 100 %: a subject
/// crosses both within a few events.
pub const BASIC_1000_TOKENS: &str = "
default_tier: basic
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 1000
    thresholds: [80, 100]
tiers:
  - name: basic
    priority: 0
    rate_multiplier: 1
";

/// Two tiers: `free` (the default) with 100 tokens a month, and `pro` with a hundred times as
/// many, so moving a subject to `pro` unblocks it.
pub const FREE_AND_PRO: &str = "
default_tier: free
timezone: UTC
quotas:
  - name: monthly_tokens
    metric: total_tokens
    period: month
    limit: 100
tiers:
  - name: free
    priority: 0
    rate_multiplier: 1
  - name: pro
    priority: 10
    rate_multiplier: 100
";
