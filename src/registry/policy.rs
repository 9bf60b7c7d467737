//! The registry's decisions as pure functions over a snapshot, so they are tested with a fake
//! clock: which loaded model to unload to make room (least recently used first), and which are
//! due for an idle unload.

use std::time::{Duration, Instant};

/// How long a loaded model stays loaded once idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    /// The server's `--idle-unload` (never, for `-m` models).
    Default,
    /// Until this instant (a dialect's `keep_alive`; the past means "as soon as it is idle").
    Until(Instant),
    /// Never unloaded for idleness.
    Forever,
}

/// What the policy sees of one loaded model.
#[derive(Debug, Clone)]
pub struct Usage {
    pub id: String,
    /// The last time a request acquired it, or it was seen serving one.
    pub last_used: Instant,
    /// Requests running or queued on its engine now.
    pub busy: bool,
    pub keep: KeepAlive,
    /// A `-m` model: kept while idle unless a `keep_alive` says otherwise.
    pub pinned: bool,
}

/// The model to unload first to make room: the least recently used idle one; a busy one only
/// when `allow_busy` (its unload then waits for its requests). Ties go to the smaller id, so the
/// choice is deterministic.
pub fn pick_victim(models: &[Usage], allow_busy: bool) -> Option<String> {
    models
        .iter()
        .filter(|m| allow_busy || !m.busy)
        .min_by(|a, b| (a.busy, a.last_used, &a.id).cmp(&(b.busy, b.last_used, &b.id)))
        .map(|m| m.id.clone())
}

/// The models due for an idle unload at `now`: idle, and past their keep-alive (`idle` is the
/// server's `--idle-unload`; `None` never unloads for idleness).
pub fn idle_due(models: &[Usage], now: Instant, idle: Option<Duration>) -> Vec<String> {
    models
        .iter()
        .filter(|m| !m.busy)
        .filter(|m| match m.keep {
            KeepAlive::Forever => false,
            KeepAlive::Until(until) => now >= until,
            KeepAlive::Default if m.pinned => false,
            KeepAlive::Default => {
                idle.is_some_and(|idle| now.saturating_duration_since(m.last_used) >= idle)
            }
        })
        .map(|m| m.id.clone())
        .collect()
}

/// When a model idle since `last_used` will be unloaded, if ever.
pub fn expires_at(
    last_used: Instant,
    keep: KeepAlive,
    pinned: bool,
    idle: Option<Duration>,
) -> Option<Instant> {
    match keep {
        KeepAlive::Forever => None,
        KeepAlive::Until(until) => Some(until),
        KeepAlive::Default if pinned => None,
        KeepAlive::Default => idle.map(|idle| last_used + idle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(id: &str, used: Instant, busy: bool) -> Usage {
        Usage {
            id: id.into(),
            last_used: used,
            busy,
            keep: KeepAlive::Default,
            pinned: false,
        }
    }

    #[test]
    fn the_least_recently_used_idle_model_goes_first() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let models = [
            usage("a", t0 + 3 * s, false),
            usage("b", t0 + s, false),
            usage("c", t0, true),
        ];
        assert_eq!(pick_victim(&models, false).as_deref(), Some("b"));
        // A busy model is older, but idle ones go first even when busy ones may go.
        assert_eq!(pick_victim(&models, true).as_deref(), Some("b"));
        let all_busy = [usage("a", t0 + s, true), usage("c", t0, true)];
        assert_eq!(pick_victim(&all_busy, false), None);
        assert_eq!(pick_victim(&all_busy, true).as_deref(), Some("c"));
        assert_eq!(pick_victim(&[], true), None);
    }

    #[test]
    fn idle_unload_follows_the_clock_and_keep_alive() {
        let t0 = Instant::now();
        let idle = Some(Duration::from_secs(600));
        let mut pinned = usage("pinned", t0, false);
        pinned.pinned = true;
        let mut forever = usage("forever", t0, false);
        forever.keep = KeepAlive::Forever;
        let mut soon = usage("soon", t0, false);
        soon.keep = KeepAlive::Until(t0 + Duration::from_secs(5));
        let models = [
            usage("idle", t0, false),
            usage("busy", t0, true),
            pinned,
            forever,
            soon,
        ];
        assert!(idle_due(&models, t0, idle).is_empty());
        assert_eq!(
            idle_due(&models, t0 + Duration::from_secs(5), idle),
            ["soon"]
        );
        assert_eq!(
            idle_due(&models, t0 + Duration::from_secs(600), idle),
            ["idle", "soon"]
        );
        // `--idle-unload 0`: only keep-alives unload.
        assert_eq!(
            idle_due(&models, t0 + Duration::from_secs(9999), None),
            ["soon"]
        );
        assert_eq!(
            expires_at(t0, KeepAlive::Default, false, idle),
            Some(t0 + Duration::from_secs(600))
        );
        assert_eq!(expires_at(t0, KeepAlive::Default, true, idle), None);
    }
}
