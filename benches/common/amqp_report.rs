//! The AMQP bench's tables and goals, from every round: each contender's figure is the median
//! over the rounds it finished (lowest-highest beside the rate), and each ratio is taken round
//! by round, leaving out a round in which either side did not finish.

use super::rounds::{self, Spread, Unit, Want};
use super::{Contender, Run};

/// Each contender's runs, one per round (indexed like the contenders).
type Samples = [Vec<Run>];

const OURS: &str = "worker + rust plugin";
const RAW: &str = "raw lapin consume-reply-ack";
/// The raw loop acking 32 deliveries at a time: the broker's ceiling with multiple-ack,
/// shown beside the goals (which stay against the per-message loop).
const RAW_MULTIPLE: &str = "raw loop, multiple-ack";
/// The per-message raw loop replying on its consuming channel.
const RAW_ONE_CHANNEL: &str = "raw loop, one channel";

/// The drain rate, NaN if the run did not finish.
fn rate(r: &Run) -> f64 {
    r.replies.as_ref().map_or(f64::NAN, |r| r.all.rate())
}

/// CPU µs per task of (the contender's processes, their children, RabbitMQ).
pub fn cpu_per_task(run: &Run, n: usize) -> (f64, f64, f64) {
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / (n.max(2) - 1) as f64;
    let main = run.cpu.per_copy.iter().map(|c| c.0).sum();
    let children = run.cpu.per_copy.iter().map(|c| c.1).sum();
    (per(main), per(children), per(run.cpu.rabbit))
}

fn index(contenders: &[&Contender], name: &str) -> Option<usize> {
    contenders.iter().position(|c| c.name == name)
}

/// `a / b`, NaN (left out of a spread) when either was not read (RabbitMQ's CPU reads 0 when
/// its process was not found).
fn known_ratio(a: f64, b: f64) -> f64 {
    if a > 0.0 && b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

/// The median of `values` (NaN when there is none).
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    Spread::of(values).map_or(f64::NAN, |s| s.median)
}

/// `f(a's run, b's run)` round by round; None for a round in which either did not finish.
fn per_round(
    samples: &Samples,
    a: usize,
    b: usize,
    f: impl Fn(&Run, &Run) -> f64,
) -> Vec<Option<f64>> {
    samples[a]
        .iter()
        .zip(&samples[b])
        .map(|(x, y)| (x.replies.is_some() && y.replies.is_some()).then(|| f(x, y)))
        .collect()
}

/// Contender `i`'s rate / the best Celery contender's in the same round.
fn x_celery(contenders: &[&Contender], samples: &Samples, i: usize) -> Vec<Option<f64>> {
    (0..samples[i].len())
        .map(|round| {
            let best = contenders
                .iter()
                .zip(samples)
                .filter(|(c, _)| c.name.starts_with("celery"))
                .map(|(_, runs)| rate(&runs[round]))
                .filter(|r| !r.is_nan())
                .reduce(f64::max)?;
            Some(rate(&samples[i][round]) / best)
        })
        .collect()
}

/// Of the runs that finished, the one with the median rate.
fn median_run(runs: &[Run]) -> Option<&Run> {
    let mut done: Vec<&Run> = runs.iter().filter(|r| r.replies.is_some()).collect();
    done.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    done.get(done.len() / 2).copied()
}

pub fn print(n: usize, rounds: usize, contenders: &[&Contender], samples: &Samples) {
    println!("\n{n} no-op tasks preloaded, rpc results; rate from first to last reply; {rounds} interleaved rounds (the order reversed every other round): tasks/s median (lowest-highest), x celery and x raw the median of per-round ratios, the rest medians");
    println!(
        "{:<30} {:>22} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "contender",
        "tasks/s",
        "x celery",
        "x raw",
        "RSS MiB",
        "kids MiB",
        "CPU us/t",
        "kids us/t",
        "rabbit us/t"
    );
    let raw = index(contenders, RAW);
    for (i, c) in contenders.iter().enumerate() {
        let done: Vec<&Run> = samples[i].iter().filter(|r| r.replies.is_some()).collect();
        let med = |f: &dyn Fn(&Run) -> f64| median(done.iter().map(|r| f(r)));
        let x_raw = raw.map_or(f64::NAN, |raw| {
            median(
                per_round(samples, raw, i, |r, o| rate(o) / rate(r))
                    .into_iter()
                    .flatten(),
            )
        });
        println!(
            "{:<30} {:>22} {:>8.2} {:>8.2} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            c.name,
            rounds::spread(done.iter().map(|r| rate(r)), 0),
            median(x_celery(contenders, samples, i).into_iter().flatten()),
            x_raw,
            med(&|r| r.rss.0 as f64 / 1024.0),
            med(&|r| r.rss.1 as f64 / 1024.0),
            med(&|r| cpu_per_task(r, n).0),
            med(&|r| cpu_per_task(r, n).1),
            med(&|r| cpu_per_task(r, n).2),
        );
        if done.len() < samples[i].len() {
            println!(
                "  ({} of {} rounds did not finish: left out of its figures and ratios)",
                samples[i].len() - done.len(),
                samples[i].len()
            );
        }
    }
    println!("(CPU us/t: CPU time of the contender's own processes per task, from /proc/<pid>/stat, over the same window as the rate; kids: their children (plugins, pool processes); rabbit: RabbitMQ's beam.smp)");
    scale(contenders, samples, n);
    one_channel(contenders, samples, n);
    ceiling(contenders, samples, n);
    goals(contenders, samples, n);
}

/// The per-message raw loop on one channel against the same on two (consuming on one,
/// replying on the other, as `worker` does): whether fewer channels would pay.
fn one_channel(contenders: &[&Contender], samples: &Samples, n: usize) {
    let (Some(raw), Some(one)) = (index(contenders, RAW), index(contenders, RAW_ONE_CHANNEL))
    else {
        return;
    };
    println!();
    let rates = per_round(samples, raw, one, |r, o| rate(o) / rate(r));
    rounds::ratio(
        "raw loop on one channel / on two (the per-message loop), drain rate",
        &rates,
        Unit::Ratio,
    );
    let cpu = per_round(samples, raw, one, |r, o| {
        cpu_per_task(o, n).0 / cpu_per_task(r, n).0
    });
    rounds::ratio("  its CPU per task / on two", &cpu, Unit::Ratio);
    let rabbit = per_round(samples, raw, one, |r, o| {
        known_ratio(cpu_per_task(o, n).2, cpu_per_task(r, n).2)
    });
    rounds::ratio("  RabbitMQ's CPU per task / with two", &rabbit, Unit::Ratio);
}

/// The broker's ceiling with multiple-ack against the per-message raw loop, and `worker`
/// against it (informational: the goals compare with the per-message loop).
fn ceiling(contenders: &[&Contender], samples: &Samples, n: usize) {
    let Some(multiple) = index(contenders, RAW_MULTIPLE) else {
        return;
    };
    println!();
    if let Some(raw) = index(contenders, RAW) {
        let rates = per_round(samples, raw, multiple, |r, m| rate(m) / rate(r));
        rounds::ratio(
            "the broker's ceiling with multiple-ack: raw loop, multiple-ack / per-message raw loop, drain rate",
            &rates,
            Unit::Ratio,
        );
        let cpu = per_round(samples, raw, multiple, |r, m| {
            cpu_per_task(m, n).0 / cpu_per_task(r, n).0
        });
        rounds::ratio(
            "  its CPU per task / the per-message loop's",
            &cpu,
            Unit::Ratio,
        );
        let rabbit = per_round(samples, raw, multiple, |r, m| {
            known_ratio(cpu_per_task(m, n).2, cpu_per_task(r, n).2)
        });
        rounds::ratio(
            "  RabbitMQ's CPU per task / with the per-message loop",
            &rabbit,
            Unit::Ratio,
        );
    }
    if let Some(ours) = index(contenders, OURS) {
        let drain = per_round(samples, multiple, ours, |m, o| rate(o) / rate(m));
        rounds::ratio(
            "worker + rust / raw loop, multiple-ack, drain rate",
            &drain,
            Unit::Ratio,
        );
    }
}

/// Ten queues at once, and two workers on one queue, against one worker on one queue.
fn scale(contenders: &[&Contender], samples: &Samples, n: usize) {
    let single = index(contenders, OURS);
    let against_single = |name: &str, i: usize| {
        if let Some(single) = single {
            let ratio = per_round(samples, single, i, |s, o| rate(o) / rate(s));
            rounds::ratio(name, &ratio, Unit::Ratio);
        }
    };
    if let Some(i) = index(contenders, "worker + rust, 10 queues") {
        let all = rounds::spread(samples[i].iter().map(rate), 0);
        let per_queue = median_run(&samples[i]).and_then(|run| {
            let rates: Vec<f64> = run
                .replies
                .as_ref()?
                .per_queue
                .iter()
                .map(|s| s.rate())
                .collect();
            let lo = rates.iter().cloned().fold(f64::INFINITY, f64::min);
            Some(format!(
                "{lo:.0} to {:.0}",
                rates.iter().cloned().fold(0.0, f64::max)
            ))
        });
        println!(
            "\n10 queues at once ({} tasks each): combined {all} tasks/s; per queue {} tasks/s in its median round",
            n / 10,
            per_queue.as_deref().unwrap_or("-")
        );
        against_single("  10 queues / one queue, combined rate", i);
    }
    if let Some(i) = index(contenders, "2 workers + rust, 1 queue") {
        let each = median_run(&samples[i]).and_then(|run| {
            let r = run.replies.as_ref()?;
            let window = (r.all.last - r.all.first).as_secs_f64().max(1e-9);
            let each: Vec<String> = run
                .acked
                .iter()
                .map(|a| format!("{:.0} tasks/s ({a} tasks)", *a as f64 / window))
                .collect();
            Some(each.join(", "))
        });
        println!(
            "two workers sharing one queue: combined {} tasks/s; each, in the median round: {}",
            rounds::spread(samples[i].iter().map(rate), 0),
            each.as_deref().unwrap_or("-")
        );
        against_single("  two workers / one worker, combined rate", i);
    }
}

fn goals(contenders: &[&Contender], samples: &Samples, n: usize) {
    let (Some(ours), Some(raw)) = (index(contenders, OURS), index(contenders, RAW)) else {
        println!("\n(no goals: they need both `{OURS}` and `{RAW}` in the run)");
        return;
    };
    rounds::goals_header();
    let drain = per_round(samples, raw, ours, |r, o| rate(o) / rate(r));
    rounds::goal(
        "worker + rust / raw lapin loop, drain rate",
        &drain,
        Want::AtLeast(0.9),
        Unit::Ratio,
    );
    let cpu = per_round(samples, raw, ours, |r, o| {
        cpu_per_task(o, n).0 / cpu_per_task(r, n).0
    });
    rounds::goal(
        "worker CPU per task / raw loop's CPU per task",
        &cpu,
        Want::AtMost(1.3),
        Unit::Ratio,
    );
    if let Some(events) = index(contenders, "worker + rust, events on") {
        rounds::goal(
            "task events on / off",
            &per_round(samples, ours, events, |o, e| rate(e) / rate(o)),
            Want::AtLeast(0.9),
            Unit::Ratio,
        );
    }
    rounds::stretch(
        "worker + rust / raw loop, drain rate",
        &drain,
        Want::Above(1.0),
        Unit::Ratio,
    );
}
