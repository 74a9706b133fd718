//! How steady the host itself is: a fixed piece of work (a random walk over 8 MiB, so it
//! touches the caches and memory as a busy process does) timed over and over on one thread,
//! with nothing else of the bench running. On a quiet machine every chunk takes about as long;
//! on a shared one the spread is how much any single measurement can move by chance.

use std::time::{Duration, Instant};

/// Steps of the walk per chunk: about 35 ms on the 2-core machine the figures come from.
const STEPS: u64 = 20_000_000;
const MEMORY: usize = 8 << 20;

/// Times `chunks` chunks of the same work, each on its own; returns each one's time.
pub fn probe(chunks: usize) -> Vec<Duration> {
    let mut memory = vec![0u8; MEMORY];
    let mut x: u64 = 1;
    (0..chunks)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..STEPS {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let i = (x >> 20) as usize & (MEMORY - 1);
                memory[i] = memory[i].wrapping_add(1);
            }
            std::hint::black_box(&memory);
            start.elapsed()
        })
        .collect()
}

/// `min, p10, p50, p90, max` of the chunks' times in ms, and the chunks in order (so a slow
/// stretch shows as a run of high numbers).
pub fn report(times: &[Duration]) {
    let ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e3).collect();
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
    println!(
        "host drift: {} chunks of the same work, ms: min {:.1}, p10 {:.1}, p50 {:.1}, p90 {:.1}, max {:.1} (p90 / p10 {:.2})",
        ms.len(),
        at(0.0),
        at(0.1),
        at(0.5),
        at(0.9),
        at(1.0),
        at(0.9) / at(0.1)
    );
    let line: Vec<String> = ms.iter().map(|m| format!("{m:.0}")).collect();
    println!("in order: {}", line.join(" "));
}
