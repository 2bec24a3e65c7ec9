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

impl From<Next> for Action {
    fn from(next: Next) -> Self {
        match next {
            Next::Change => Action::await_change(),
            Next::After(after) => Action::requeue(after),
        }
    }
}
