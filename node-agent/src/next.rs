//! When a controller looks at an object again. It is part of every decision, so the
//! pure parts of the controllers say it, and the shells hand it to kube as an
//! `Action`.

use std::time::Duration;

use kube::runtime::controller::Action;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// When the object changes.
    Change,
    /// After this long, or when the object changes.
    After(Duration),
}

impl Next {
    /// The sooner of two looks (a host that plays two parts looks again when
    /// either asks).
    pub fn sooner(self, other: Next) -> Next {
        match (self, other) {
            (Next::After(a), Next::After(b)) => Next::After(a.min(b)),
            (Next::After(a), Next::Change) | (Next::Change, Next::After(a)) => Next::After(a),
            (Next::Change, Next::Change) => Next::Change,
        }
    }
}

impl From<Next> for Action {
    fn from(next: Next) -> Self {
        match next {
            Next::Change => Action::await_change(),
            Next::After(after) => Action::requeue(after),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sooner_look_wins() {
        let (a, b) = (Next::After(Duration::from_millis(50)), Next::After(Duration::from_secs(2)));
        assert_eq!(a.sooner(b), a);
        assert_eq!(b.sooner(a), a);
        assert_eq!(Next::Change.sooner(b), b);
        assert_eq!(b.sooner(Next::Change), b);
        assert_eq!(Next::Change.sooner(Next::Change), Next::Change);
    }
}
