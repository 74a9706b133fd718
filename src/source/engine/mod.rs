//! The Celery engine: what a Celery worker decides and keeps, whatever carries its messages.
//! Who answers each task id ([`ledger`]), the revoked ids ([`revoked`]), what a delivery does
//! before it runs and how its outcome ends on the wire ([`rules`]), and the per-task limits
//! remote control sets ([`task_controls`]). No transport types here: a transport (the AMQP
//! source) carries the decisions out, and everything here is unit-tested without a broker.

/// Public only for the scale bench, which measures it at its limits.
#[doc(hidden)]
pub mod ledger;
/// Public only for the scale bench, which measures it at its limits.
#[doc(hidden)]
pub mod revoked;
pub(crate) mod rules;
pub(crate) mod task_controls;
