//! When pre-copy ends: the convergence decision. After each pass the loop reads
//! the dirty log and asks [`decide`] what to do with the figures it has (no clock,
//! no I/O: figures in, a decision with its reason out): copy another pass, slow
//! the guest down first (auto-converge), pause it and send the rest, or give up
//! and leave it running here.

/// Guest page size.
const PAGE: u64 = 4096;

/// Below this estimated pause (µs), pre-copy stops even while passes still shrink.
/// The pages of the last pass go while the guest is paused: a pass of 2 ms left
/// 2 ms of pages to send paused, where one more short pass leaves a tenth of that.
pub const DOWNTIME_FLOOR_US: u64 = 500;

/// What a switch-over costs besides its pages, counted against the budget: the
/// pause, the state, the target's restore and two round trips (0.7-1 ms measured
/// on our hosts in release builds).
pub const SWITCHOVER_FIXED_US: u64 = 1000;

/// The throttle's steps (percent of time the vCPUs are held): one step up per
/// pass that did not converge, unless the dirty rate asks for more at once.
const THROTTLE_STEPS: [u32; 6] = [30, 50, 70, 85, 95, 99];

/// What the pre-copy loop knows once it has read the dirty log after a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pass {
    /// Passes sent so far (1: the first, full pass).
    pub number: u32,
    /// Pages dirtied since the last pass: what the next pass (or the
    /// switch-over) sends.
    pub dirty_pages: u64,
    /// Pages the last pass sent (at least 1).
    pub last_sent: u64,
    /// How fast the guest dirtied memory during the last pass, bytes/s.
    pub dirty_rate: u64,
    /// The link's bandwidth as measured so far, bytes/s.
    pub bandwidth: u64,
    /// The vCPU throttle in force, percent.
    pub throttle_percent: u32,
}

/// The request's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest acceptable pause, ms.
    pub max_downtime_ms: u64,
    /// Passes before giving up.
    pub max_passes: u32,
}

/// How long the guest would be paused if the switch-over came now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Sending the dirty pages at the measured bandwidth, µs.
    pub pages_us: u64,
    /// The whole pause (the pages and the switch-over's fixed cost), in ms
    /// rounded up: what the budget is checked against.
    pub total_ms: u64,
}

/// The pause a switch-over with `dirty_pages` to send would take at `bandwidth`.
pub fn estimate(dirty_pages: u64, bandwidth: u64) -> Estimate {
    let pages_us = dirty_pages.saturating_mul(PAGE).saturating_mul(1_000_000) / bandwidth.max(1);
    Estimate { pages_us, total_ms: pages_us.saturating_add(SWITCHOVER_FIXED_US).div_ceil(1000) }
}

/// What pre-copy does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send another pass, the guest running as it does.
    Continue(WhyContinue),
    /// Hold the vCPUs `percent` of the time, then send another pass: the last
    /// pass did not halve what is left, and the pause would be over budget.
    Throttle { percent: u32 },
    /// Pause the guest and send the rest.
    SwitchOver(WhySwitch),
    /// Stop; the guest keeps running here: the pause is still over budget and
    /// one more pass would pass the request's limit.
    GiveUp,
}

/// Why another pass goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhyContinue {
    /// Within the budget, but each pass still halves what is left and the pause
    /// is above the floor: every page sent now is one less to send paused.
    Shrinking,
    /// Over the budget, and the passes still shrink: they may get there alone.
    OverBudget,
}

/// Why the switch-over comes now (always within the budget).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhySwitch {
    /// The pause would be below [`DOWNTIME_FLOOR_US`]: nothing to gain.
    BelowFloor,
    /// The last pass did not halve what is left: another would not do better.
    StoppedShrinking,
    /// One more pass would reach the request's limit.
    LastPass,
}

/// The decision after pass `pass` under `limits`.
pub fn decide(pass: &Pass, limits: &Limits) -> Decision {
    let estimate = estimate(pass.dirty_pages, pass.bandwidth);
    // A pass that dirties half of what the last one sent, or more, does not converge.
    let shrinking = pass.dirty_pages.saturating_mul(2) <= pass.last_sent;
    let last_pass = pass.number.saturating_add(1) >= limits.max_passes;
    if estimate.total_ms <= limits.max_downtime_ms {
        return if estimate.pages_us <= DOWNTIME_FLOOR_US {
            Decision::SwitchOver(WhySwitch::BelowFloor)
        } else if !shrinking {
            Decision::SwitchOver(WhySwitch::StoppedShrinking)
        } else if last_pass {
            Decision::SwitchOver(WhySwitch::LastPass)
        } else {
            Decision::Continue(WhyContinue::Shrinking)
        };
    }
    if pass.number.saturating_add(1) > limits.max_passes {
        return Decision::GiveUp;
    }
    if shrinking {
        return Decision::Continue(WhyContinue::OverBudget);
    }
    // Auto-converge: a pass that did not halve what is left means the guest
    // dirties memory about as fast as the link carries it; slow its vCPUs one
    // step per such pass (waiting longer only makes the migration longer), or
    // at once to what the dirty rate needs.
    let step = THROTTLE_STEPS.iter().copied().find(|p| *p > pass.throttle_percent).unwrap_or(99);
    Decision::Throttle { percent: step.max(needed_throttle(pass.dirty_rate, pass.bandwidth)) }
}

/// The throttle (percent of time the vCPUs are held) that brings a guest dirtying
/// `dirty_rate` bytes/s down to a quarter of the link's `bandwidth`, so that each
/// pass leaves at most a quarter of itself to the next: what it takes to converge
/// in a few passes rather than creeping up on it one step per pass. At most 99:
/// never a full stop.
pub fn needed_throttle(dirty_rate: u64, bandwidth: u64) -> u32 {
    if dirty_rate == 0 {
        return 0;
    }
    let allowed = bandwidth as f64 / 4.0;
    (((1.0 - allowed / dirty_rate as f64) * 100.0).ceil().clamp(0.0, 99.0)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    /// 1 GiB/s: 262144 pages a second, 262 pages a millisecond.
    const LINK: u64 = GIB;

    fn pass(number: u32, dirty_pages: u64, last_sent: u64) -> Pass {
        Pass { number, dirty_pages, last_sent, dirty_rate: 0, bandwidth: LINK, throttle_percent: 0 }
    }

    const LIMITS: Limits = Limits { max_downtime_ms: 30, max_passes: 30 };

    #[test]
    fn estimates_count_the_pages_and_the_fixed_cost() {
        assert_eq!(estimate(0, LINK), Estimate { pages_us: 0, total_ms: 1 });
        // 256 MiB at 1 GiB/s: 250 ms, plus 1 ms.
        assert_eq!(estimate(256 * MIB / PAGE, LINK), Estimate { pages_us: 250_000, total_ms: 251 });
        assert_eq!(estimate(1, 0).pages_us, 4_096_000_000, "no bandwidth measured yet: as if 1 byte/s");
        assert_eq!(estimate(u64::MAX, 1).total_ms, u64::MAX / 1000 + 1, "no overflow");
    }

    #[test]
    fn a_table_of_passes() {
        use Decision::{Continue, GiveUp, SwitchOver, Throttle};
        use WhyContinue::{OverBudget, Shrinking};
        use WhySwitch::{BelowFloor, LastPass, StoppedShrinking};
        // 100 pages: 0.4 ms at 1 GiB/s; 2500 pages: 9.5 ms; 26214 pages: 100 ms.
        let cases: &[(&str, Pass, Limits, Decision)] = &[
            ("an idle guest: the floor", pass(1, 100, 100_000), LIMITS, SwitchOver(BelowFloor)),
            ("nothing dirty at all", pass(1, 0, 1), LIMITS, SwitchOver(BelowFloor)),
            ("within budget, still halving", pass(1, 2500, 100_000), LIMITS, Continue(Shrinking)),
            ("within budget, exactly halving", pass(2, 2500, 5000), LIMITS, Continue(Shrinking)),
            ("within budget, not halving", pass(2, 2500, 4999), LIMITS, SwitchOver(StoppedShrinking)),
            ("within budget, the pass before the limit", pass(29, 2500, 100_000), LIMITS, SwitchOver(LastPass)),
            ("over budget, halving", pass(1, 26214, 262_144), LIMITS, Continue(OverBudget)),
            ("over budget at the limit", pass(30, 26214, 262_144), LIMITS, GiveUp),
            ("over budget, one pass left", pass(29, 26214, 262_144), LIMITS, Continue(OverBudget)),
            ("over budget, not halving: throttle", pass(2, 26214, 30_000), LIMITS, Throttle { percent: 30 }),
            (
                "a bigger budget takes the same pass",
                pass(2, 26214, 30_000),
                Limits { max_downtime_ms: 250, max_passes: 30 },
                SwitchOver(StoppedShrinking),
            ),
            (
                "one pass allowed: switch over if it fits",
                pass(1, 2500, 100_000),
                Limits { max_downtime_ms: 30, max_passes: 1 },
                SwitchOver(LastPass),
            ),
            (
                "one pass allowed: give up if it does not",
                pass(1, 26214, 100_000),
                Limits { max_downtime_ms: 30, max_passes: 1 },
                GiveUp,
            ),
        ];
        for (what, pass, limits, want) in cases {
            assert_eq!(decide(pass, limits), *want, "{what}: {pass:?}");
        }
    }

    #[test]
    fn the_throttle_goes_up_a_step_or_to_what_the_dirty_rate_needs() {
        let over = |throttle_percent, dirty_rate| Pass {
            number: 3,
            dirty_pages: 26214,
            last_sent: 30_000,
            dirty_rate,
            bandwidth: LINK,
            throttle_percent,
        };
        // (throttle now, dirty rate) -> throttle next
        let cases = [
            (0, 0, 30),
            (30, 0, 50),
            (50, 100 * MIB, 70),
            (85, 0, 95),
            (95, 0, 99),
            (99, 0, 99),
            (42, 0, 50),
            // Dirtying twice the link: 88 % at once rather than step by step.
            (0, 2 * LINK, 88),
            (95, 2 * LINK, 99),
        ];
        for (now, rate, next) in cases {
            assert_eq!(decide(&over(now, rate), &LIMITS), Decision::Throttle { percent: next }, "{now} % at {rate}");
        }
    }

    #[test]
    fn passes_of_a_guest_that_converges_alone_and_of_one_that_needs_the_throttle() {
        // The loop's walk: each row is the dirty log after a pass, and what the
        // loop does with it. A guest writing 100 MiB/s over a 1 GiB/s link: each
        // pass leaves a tenth of itself.
        let walk = [
            (pass(1, 25_000, 262_144), Decision::Continue(WhyContinue::OverBudget)),
            (pass(2, 2_500, 25_000), Decision::Continue(WhyContinue::Shrinking)),
            (pass(3, 250, 2_500), Decision::Continue(WhyContinue::Shrinking)),
            (pass(4, 25, 250), Decision::SwitchOver(WhySwitch::BelowFloor)),
        ];
        for (p, want) in walk {
            assert_eq!(decide(&p, &LIMITS), want, "{p:?}");
        }
        // A guest dirtying 2 GiB/s over the same link: the pass after the first
        // is as big as the first would allow; the throttle goes straight to 88 %,
        // then a step per pass that still does not halve what is left, until the
        // pause fits the budget.
        let hot = |number, dirty_pages, last_sent, throttle_percent| Pass {
            number,
            dirty_pages,
            last_sent,
            dirty_rate: 2 * LINK,
            bandwidth: LINK,
            throttle_percent,
        };
        let walk = [
            (hot(1, 200_000, 262_144, 0), Decision::Throttle { percent: 88 }),
            (hot(2, 120_000, 200_000, 88), Decision::Throttle { percent: 95 }),
            (hot(3, 70_000, 120_000, 95), Decision::Throttle { percent: 99 }),
            (hot(4, 6_000, 70_000, 99), Decision::SwitchOver(WhySwitch::LastPass)),
        ];
        let limits = Limits { max_downtime_ms: 30, max_passes: 5 };
        for (p, want) in walk {
            assert_eq!(decide(&p, &limits), want, "{p:?}");
        }
        // The same guest with three passes allowed gives up: still over budget.
        assert_eq!(
            decide(&hot(3, 70_000, 120_000, 95), &Limits { max_downtime_ms: 30, max_passes: 3 }),
            Decision::GiveUp
        );
    }

    #[test]
    fn throttle_brings_the_dirty_rate_to_a_quarter_of_the_link() {
        assert_eq!(needed_throttle(0, GIB), 0, "an idle guest needs none");
        assert_eq!(needed_throttle(GIB / 4, GIB), 0, "already slow enough");
        assert_eq!(needed_throttle(GIB, GIB), 75);
        assert_eq!(needed_throttle(2 * GIB, GIB), 88);
        assert_eq!(needed_throttle(u64::MAX / 2, 1), 99, "never a full stop");
    }
}
