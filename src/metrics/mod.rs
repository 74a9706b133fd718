//! What the daemon counts for Prometheus: tasks by plugin, task and outcome, task durations,
//! the broker's deliveries and result publishing, plugin changes, and, read from the pools at
//! scrape time, in-flight and queued tasks and the state of every instance.
//!
//! Labels are low-cardinality by construction: plugin and task names come from manifests (a
//! task nobody serves is counted under `task=""`), outcomes from a closed set, never task ids
//! or pids. Counting is always on (atomic adds); serving them is `metrics_listen` ([`http`]).

mod broker;
pub mod http;

use crate::broker_status::BrokerBoard;
use crate::idmap::IdMap;
use crate::supervisor::status::{InstanceState, PluginStatus};
use crate::supervisor::ReloadReport;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One task's series in the task families (handles share the families' values).
#[derive(Debug)]
struct TaskSeries {
    duration: Histogram,
    /// By outcome; a task ends in few of them.
    outcomes: Vec<(&'static str, Counter)>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskOutcome {
    plugin: String,
    task: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskName {
    plugin: String,
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeResult {
    result: &'static str,
}

/// How a broker delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Acked,
    Rejected,
    /// Rejected without requeue to a queue with a dead-letter exchange.
    DeadLettered,
    Requeued,
}

impl Settled {
    fn label(self) -> &'static str {
        match self {
            Settled::Acked => "acked",
            Settled::Rejected => "rejected",
            Settled::DeadLettered => "dead_lettered",
            Settled::Requeued => "requeued",
        }
    }
}

/// The daemon's metrics. Cheap to update from any task; [`Metrics::encode`] renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tasks: Family<TaskOutcome, Counter>,
    task_duration: Family<TaskName, Histogram>,
    /// Handles on the two families' series by plugin and task name, looked up without
    /// allocating (a task's end cost four label strings and two family lookups).
    task_series: std::sync::RwLock<IdMap<IdMap<TaskSeries>>>,
    broker_connected: Gauge,
    broker_reconnects: Counter,
    broker_was_up: AtomicBool,
    deliveries: Family<Kind, Counter>,
    result_publish: Histogram,
    plugin_changes: Family<ChangeResult, Counter>,
    pools: Arc<PoolSnapshot>,
    /// The broker source's view of its connection and queues (also `plugins.status`'s).
    broker: BrokerBoard,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("worker");
        let tasks = Family::<TaskOutcome, Counter>::default();
        registry.register(
            "tasks",
            "Tasks ended, by plugin, task and outcome (success or the failure kind)",
            tasks.clone(),
        );
        let task_duration = Family::<TaskName, Histogram>::new_with_constructor(|| {
            // 1 ms .. ~9 h in x4 steps: no-op tasks to long batch jobs.
            Histogram::new(exponential_buckets(0.001, 4.0, 13))
        });
        registry.register_with_unit(
            "task_duration",
            "Time from a task's admission to its outcome, reruns included",
            Unit::Seconds,
            task_duration.clone(),
        );
        let broker_connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 while the broker connection is up and consuming (0 without a broker)",
            broker_connected.clone(),
        );
        let broker_reconnects = Counter::default();
        registry.register(
            "broker_reconnects",
            "Broker connections re-established after a loss",
            broker_reconnects.clone(),
        );
        let deliveries = Family::<Kind, Counter>::default();
        registry.register(
            "broker_deliveries",
            "Broker deliveries settled, by how: acked, rejected, dead_lettered, requeued",
            deliveries.clone(),
        );
        let result_publish = Histogram::new(exponential_buckets(0.0001, 4.0, 11));
        registry.register_with_unit(
            "result_publish",
            "Time from publishing a result to the broker's confirm",
            Unit::Seconds,
            result_publish.clone(),
        );
        let plugin_changes = Family::<ChangeResult, Counter>::default();
        registry.register(
            "plugin_installs",
            "Plugins applied from the install record by result: started, replaced, removed, restarted, failed",
            plugin_changes.clone(),
        );
        registry.register(
            "build",
            "This worker's version",
            Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
        let pools = Arc::new(PoolSnapshot::default());
        registry.register_collector(Box::new(pools.clone()));
        let broker = BrokerBoard::default();
        registry.register_collector(Box::new(broker::BrokerCollector(broker.clone())));
        Metrics {
            registry,
            tasks,
            task_duration,
            task_series: Default::default(),
            broker_connected,
            broker_reconnects,
            broker_was_up: AtomicBool::new(false),
            deliveries,
            result_publish,
            plugin_changes,
            pools,
            broker,
        }
    }

    /// A task ended: `plugin` served it (empty when none did), `task` is its name when some
    /// plugin serves it, `outcome` what [`crate::task::Outcome::kind`] says.
    pub fn task_ended(&self, plugin: &str, task: &str, outcome: &'static str, took: Duration) {
        let seen = |series: &IdMap<IdMap<TaskSeries>>| {
            let series = series.get(plugin)?.get(task)?;
            let (_, counter) = series.outcomes.iter().find(|(o, _)| *o == outcome)?;
            counter.inc();
            series.duration.observe(took.as_secs_f64());
            Some(())
        };
        if seen(&crate::sync::read(&self.task_series)).is_some() {
            return;
        }
        let name = TaskName {
            plugin: plugin.to_string(),
            task: task.to_string(),
        };
        let counter = self
            .tasks
            .get_or_create(&TaskOutcome {
                plugin: name.plugin.clone(),
                task: name.task.clone(),
                outcome,
            })
            .clone();
        let duration = self.task_duration.get_or_create(&name).clone();
        counter.inc();
        duration.observe(took.as_secs_f64());
        let mut all = crate::sync::write(&self.task_series);
        let series = all
            .entry(name.plugin)
            .or_default()
            .entry(name.task)
            .or_insert_with(|| TaskSeries {
                duration,
                outcomes: Vec::new(),
            });
        if !series.outcomes.iter().any(|(o, _)| *o == outcome) {
            series.outcomes.push((outcome, counter));
        }
    }

    /// What the broker source saw last, written by it and read by status reports.
    pub fn broker(&self) -> &BrokerBoard {
        &self.broker
    }

    /// The broker connection came up (counted as a reconnect after the first) or went down.
    pub fn broker_connected(&self, up: bool) {
        self.broker_connected.set(i64::from(up));
        if up && self.broker_was_up.swap(true, Ordering::Relaxed) {
            self.broker_reconnects.inc();
        }
    }

    pub fn delivery_settled(&self, how: Settled) {
        self.deliveries
            .get_or_create(&Kind {
                outcome: how.label(),
            })
            .inc();
    }

    pub fn result_confirmed(&self, took: Duration) {
        self.result_publish.observe(took.as_secs_f64());
    }

    /// What a reload did with each plugin of the install record.
    pub fn plugins_applied(&self, report: &ReloadReport) {
        let counts = [
            ("started", report.started.len()),
            ("replaced", report.replaced.len()),
            ("removed", report.removed.len()),
            ("restarted", report.restarted.len()),
            ("failed", report.failed.len()),
        ];
        for (result, n) in counts {
            self.plugin_changes
                .get_or_create(&ChangeResult { result })
                .inc_by(n as u64);
        }
    }

    /// The OpenMetrics text of every metric, with the pools as `status` reports them now.
    pub fn encode(&self, status: Vec<PluginStatus>) -> String {
        *crate::sync::lock(&self.pools.plugins) = status;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The pools' status at the last scrape, encoded as gauges and counters.
#[derive(Debug, Default)]
struct PoolSnapshot {
    plugins: Mutex<Vec<PluginStatus>>,
}

const INSTANCE_STATES: [(InstanceState, &str); 7] = [
    (InstanceState::Starting, "starting"),
    (InstanceState::Ready, "ready"),
    (InstanceState::Crashed, "crashed"),
    (InstanceState::Backoff, "backoff"),
    (InstanceState::Stopping, "stopping"),
    (InstanceState::Stopped, "stopped"),
    (InstanceState::Failed, "failed"),
];

impl PoolSnapshot {
    /// One metric with a value per plugin.
    fn per_plugin<M: EncodeMetric>(
        encoder: &mut DescriptorEncoder,
        plugins: &[PluginStatus],
        (name, help): (&str, &str),
        value: impl Fn(&PluginStatus) -> M,
    ) -> Result<(), std::fmt::Error> {
        let Some(first) = plugins.first() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(name, help, None, value(first).metric_type())?;
        for p in plugins {
            value(p).encode(family.encode_family(&[("plugin", p.name.as_str())])?)?;
        }
        Ok(())
    }

    /// The metrics with a value per instance slot or per instance state.
    fn per_instance(
        encoder: &mut DescriptorEncoder,
        plugins: &[PluginStatus],
    ) -> Result<(), std::fmt::Error> {
        if plugins.is_empty() {
            return Ok(());
        }
        let gauge = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "instances",
            "Instances of a plugin by state",
            None,
            gauge.metric_type(),
        )?;
        for p in plugins {
            for (state, label) in INSTANCE_STATES {
                let n = p.instances.iter().filter(|i| i.state == state).count();
                let labels = [("plugin", p.name.as_str()), ("state", label)];
                ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "instance_uptime_seconds",
            "Seconds since an instance's process started (absent while it is down)",
            None,
            ConstGauge::new(0.0f64).metric_type(),
        )?;
        for p in plugins {
            for i in &p.instances {
                if let Some(up) = i.uptime_secs {
                    let index = i.index.to_string();
                    let labels = [("plugin", p.name.as_str()), ("instance", index.as_str())];
                    ConstGauge::new(up).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

impl Collector for PoolSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let plugins = crate::sync::lock(&self.plugins);
        let sum = |p: &PluginStatus, f: fn(&crate::supervisor::status::InstanceStatus) -> u64| {
            p.instances.iter().map(f).sum::<u64>()
        };
        let e = &mut encoder;
        Self::per_plugin(
            e,
            &plugins,
            ("tasks_in_flight", "Tasks running on a plugin's processes"),
            |p| ConstGauge::new(sum(p, |i| i.in_flight as u64) as i64),
        )?;
        Self::per_plugin(
            e,
            &plugins,
            (
                "tasks_queued",
                "Tasks waiting for a free instance of a plugin",
            ),
            |p| ConstGauge::new(p.queued as i64),
        )?;
        Self::per_plugin(
            e,
            &plugins,
            (
                "instance_restarts",
                "Restarts of a plugin's instances since its current version started",
            ),
            |p| ConstCounter::new(sum(p, |i| u64::from(i.restarts))),
        )?;
        Self::per_plugin(
            e,
            &plugins,
            (
                "stray_stdout_lines",
                "Non-protocol lines a plugin's processes wrote to stdout",
            ),
            |p| ConstCounter::new(sum(p, |i| i.stray_stdout_lines)),
        )?;
        Self::per_plugin(
            e,
            &plugins,
            (
                "protocol_violations",
                "Processes of a plugin ended for breaking the protocol",
            ),
            |p| ConstCounter::new(sum(p, |i| i.protocol_violations)),
        )?;
        Self::per_plugin(
            e,
            &plugins,
            (
                "plugin_uptime_seconds",
                "Seconds since a plugin's current version started",
            ),
            |p| ConstGauge::new(p.uptime_secs),
        )?;
        Self::per_instance(e, &plugins)?;
        Self::per_backend(e, &plugins)
    }
}

impl PoolSnapshot {
    /// The work of queue and result backends (protocol 1.5), for the plugins that provide one.
    fn per_backend(
        e: &mut DescriptorEncoder,
        plugins: &[PluginStatus],
    ) -> Result<(), std::fmt::Error> {
        let backends: Vec<PluginStatus> = plugins
            .iter()
            .filter(|p| p.backends.is_some())
            .cloned()
            .collect();
        let b = |p: &PluginStatus| p.backends.clone().unwrap_or_default();
        type Read = fn(&crate::supervisor::status::BackendsStatus) -> u64;
        let gauges: [(&str, &str, Read); 2] = [
            (
                "offers_in_flight",
                "Offered tasks a queue backend waits for",
                |b| b.offers_in_flight,
            ),
            (
                "results_pending",
                "Final states waiting for a result backend to store them",
                |b| b.results_pending,
            ),
        ];
        for (name, help, read) in gauges {
            Self::per_plugin(e, &backends, (name, help), |p| {
                ConstGauge::new(read(&b(p)) as i64)
            })?;
        }
        let counters: [(&str, &str, Read); 5] = [
            (
                "offers_answered",
                "Offers answered with a final state",
                |b| b.offers_answered,
            ),
            (
                "offers_not_taken",
                "Offers answered not run (offer again later)",
                |b| b.offers_not_taken,
            ),
            (
                "offers_refused",
                "Offers refused as malformed or beyond the window",
                |b| b.offers_refused,
            ),
            (
                "results_stored",
                "Final states a result backend stored",
                |b| b.results_stored,
            ),
            (
                "result_store_failures",
                "result.store attempts that failed (retried)",
                |b| b.result_store_failures,
            ),
        ];
        for (name, help, read) in counters {
            Self::per_plugin(e, &backends, (name, help), |p| {
                ConstCounter::new(read(&b(p)))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counted through the cached series as through the families: each outcome and the
    /// durations of every end, per plugin and task.
    #[test]
    fn task_ends_are_counted_by_outcome_and_timed() {
        let m = Metrics::new();
        for (plugin, task, outcome) in [
            ("p", "t", "success"),
            ("p", "t", "success"),
            ("p", "t", "raised"),
            ("q", "t", "success"),
            ("", "", "not_registered"),
        ] {
            m.task_ended(plugin, task, outcome, Duration::from_millis(3));
        }
        let text = m.encode(Vec::new());
        for line in [
            r#"worker_tasks_total{plugin="p",task="t",outcome="success"} 2"#,
            r#"worker_tasks_total{plugin="p",task="t",outcome="raised"} 1"#,
            r#"worker_tasks_total{plugin="q",task="t",outcome="success"} 1"#,
            r#"worker_tasks_total{plugin="",task="",outcome="not_registered"} 1"#,
            r#"worker_task_duration_seconds_count{plugin="p",task="t"} 3"#,
            r#"worker_task_duration_seconds_count{plugin="q",task="t"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
