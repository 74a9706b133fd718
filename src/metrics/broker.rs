//! The broker's state at scrape time, from the [`BrokerBoard`] the source keeps: whether each
//! wanted queue is consumed, how often the broker refused it, and failed connection attempts.
//! Queue labels are the queues the worker consumes (its settings and `add_consumer`), never
//! names taken from messages.

use crate::broker_status::{BrokerBoard, QueueState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub(super) struct BrokerCollector(pub(super) BrokerBoard);

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Without a broker there is nothing to say (not even zeros).
        let Some(status) = self.0.snapshot() else {
            return Ok(());
        };
        let failures = ConstGauge::new(i64::from(status.failures));
        failures.encode(encoder.encode_descriptor(
            "broker_failed_attempts",
            "Failed broker connection attempts since the connection was last up",
            None,
            failures.metric_type(),
        )?)?;
        if status.queues.is_empty() {
            return Ok(());
        }
        let mut family = encoder.encode_descriptor(
            "broker_queue_consuming",
            "1 while a wanted queue is consumed, 0 while the broker refuses it or the connection is down",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for q in &status.queues {
            let up = q.state == QueueState::Consuming
                && status.state == crate::broker_status::LinkState::Connected;
            ConstGauge::new(i64::from(up))
                .encode(family.encode_family(&[("queue", q.name.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "broker_queue_refusals",
            "Times the broker refused to declare or consume a wanted queue",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for q in &status.queues {
            ConstCounter::new(q.refusals)
                .encode(family.encode_family(&[("queue", q.name.as_str())])?)?;
        }
        Ok(())
    }
}
