//! Interleaved rounds and the goals read from them, shared by the benches: how many rounds
//! (`BENCH_ROUNDS`), the order a round runs its measurements in, the median and spread of
//! per-round figures, and one line per goal.
//!
//! A ratio is taken round by round (contender / baseline from the same round's two runs) and
//! its median and spread (lowest-highest) are over those per-round ratios, never a ratio of
//! medians: drift in the machine's speed between rounds then cancels out. A goal is met only
//! when the whole spread clears it, over at least [`MIN_ROUNDS`] rounds.

/// Goals are judged on at least this many rounds.
pub const MIN_ROUNDS: usize = 5;

/// `BENCH_ROUNDS`, [`MIN_ROUNDS`] when unset. Fewer only when asked for, with a warning that no
/// goal can then be met.
pub fn from_env() -> usize {
    let Some(asked) = std::env::var("BENCH_ROUNDS").ok() else {
        return MIN_ROUNDS;
    };
    let Ok(n) = asked.trim().parse::<usize>() else {
        println!("warning: BENCH_ROUNDS={asked:?} is not a number; running {MIN_ROUNDS} rounds");
        return MIN_ROUNDS;
    };
    let n = n.max(1);
    if n < MIN_ROUNDS {
        println!(
            "warning: BENCH_ROUNDS={n}: goals need >= {MIN_ROUNDS} rounds, so none is met in this run"
        );
    }
    n
}

/// The order `round` (1-based) runs `items` in: as listed (each baseline listed before its
/// contender) in odd rounds, reversed in even ones, so drift within a round hits both sides of
/// every pair alike.
pub fn in_order<T: Clone>(round: usize, items: &[T]) -> Vec<T> {
    let mut order = items.to_vec();
    if round.is_multiple_of(2) {
        order.reverse();
    }
    order
}

/// The median and the lowest and highest of per-round figures.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many rounds the figures came from.
    pub rounds: usize,
}

impl Spread {
    /// None when there is no figure (NaN counts as none).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
            rounds: v.len(),
        })
    }

    /// `median (min-max)` with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        format!(
            "{:.d$} ({:.d$}-{:.d$})",
            self.median,
            self.min,
            self.max,
            d = digits
        )
    }
}

/// `median (min-max)` of `values`, or `-` when there is none.
pub fn spread(values: impl IntoIterator<Item = f64>, digits: usize) -> String {
    Spread::of(values).map_or_else(|| "-".to_string(), |s| s.show(digits))
}

/// Which way a goal points.
#[derive(Debug, Clone, Copy)]
pub enum Want {
    /// Higher is better: met when the lowest round is at least this.
    AtLeast(f64),
    /// Lower is better: met when the highest round is at most this.
    AtMost(f64),
    /// Higher is better, strictly: met when the lowest round is above this.
    Above(f64),
}

impl Want {
    fn cleared_by(self, s: &Spread) -> bool {
        match self {
            Want::AtLeast(g) => s.min >= g,
            Want::AtMost(g) => s.max <= g,
            Want::Above(g) => s.min > g,
        }
    }

    fn show(self, unit: Unit) -> String {
        let (sign, g) = match self {
            Want::AtLeast(g) => (">=", g),
            Want::AtMost(g) => ("<=", g),
            Want::Above(g) => (">", g),
        };
        match unit {
            Unit::Ratio => format!("{sign} {g:?}x"),
            Unit::Micros => format!("{sign} {g} µs"),
        }
    }
}

/// What a figure counts.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// A ratio, printed `0.85x`.
    Ratio,
    /// Microseconds, printed `12.3 µs`.
    Micros,
}

impl Unit {
    fn show(self, v: f64, digits: usize) -> String {
        match self {
            Unit::Ratio => format!("{v:.digits$}x"),
            Unit::Micros => format!("{v:.digits$} µs"),
        }
    }

    fn digits(self) -> usize {
        match self {
            Unit::Ratio => 2,
            Unit::Micros => 1,
        }
    }
}

/// The heading above a bench's goal lines, with how idle CPUs waited (`idle.rs`).
pub fn goals_header() {
    let idle = super::idle::mode();
    println!("\ngoals ({idle}): median of the per-round figures (lowest-highest); met only when the whole spread clears the goal, over >= {MIN_ROUNDS} rounds");
}

/// Prints `goal <name>` with its median, spread and verdict, and the per-round figures below it
/// (`None`: a round left out because a run it needs did not finish). Returns whether it is met.
pub fn goal(name: &str, per_round: &[Option<f64>], want: Want, unit: Unit) -> bool {
    judge("goal", name, per_round, want, unit)
}

/// [`goal`] for a stretch goal, labelled `stretch`.
pub fn stretch(name: &str, per_round: &[Option<f64>], want: Want, unit: Unit) -> bool {
    judge("stretch", name, per_round, want, unit)
}

fn judge(label: &str, name: &str, per_round: &[Option<f64>], want: Want, unit: Unit) -> bool {
    let digits = unit.digits();
    let per_round = &finite(per_round);
    let Some(s) = Spread::of(per_round.iter().flatten().copied()) else {
        println!(
            "{label} {name}: no round to judge it on (goal {}): NOT met",
            want.show(unit)
        );
        return false;
    };
    let cleared = want.cleared_by(&s);
    let met = cleared && s.rounds >= MIN_ROUNDS;
    let verdict = match (met, cleared) {
        (true, _) => "met".to_string(),
        (false, true) => format!(
            "NOT met: the spread clears it but over only {} rounds",
            s.rounds
        ),
        (false, false) => "NOT met".to_string(),
    };
    println!(
        "{label} {name}: {} ({:.digits$}-{:.digits$} over {} rounds; goal {}): {verdict}",
        unit.show(s.median, digits),
        s.min,
        s.max,
        s.rounds,
        want.show(unit)
    );
    println!("    per round: {}", per_round_text(per_round, digits));
    met
}

/// An informational ratio (no goal): median (lowest-highest), then the per-round figures.
pub fn ratio(name: &str, per_round: &[Option<f64>], unit: Unit) {
    let digits = unit.digits();
    let per_round = &finite(per_round);
    match Spread::of(per_round.iter().flatten().copied()) {
        Some(s) => println!(
            "{name}: {} ({:.digits$}-{:.digits$} over {} rounds); per round: {}",
            unit.show(s.median, digits),
            s.min,
            s.max,
            s.rounds,
            per_round_text(per_round, digits)
        ),
        None => println!("{name}: no round finished"),
    }
}

/// A figure that is not a number (0 / 0) counts as left out.
fn finite(per_round: &[Option<f64>]) -> Vec<Option<f64>> {
    per_round
        .iter()
        .map(|v| v.filter(|x| x.is_finite()))
        .collect()
}

/// `0.81 0.79 - 0.84` (a round left out shows as `-`), then which rounds were left out.
fn per_round_text(per_round: &[Option<f64>], digits: usize) -> String {
    let figures: Vec<String> = per_round
        .iter()
        .map(|v| v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}")))
        .collect();
    let left_out: Vec<String> = (1..=per_round.len())
        .filter(|&r| per_round[r - 1].is_none())
        .map(|r| r.to_string())
        .collect();
    let mut text = figures.join(" ");
    if !left_out.is_empty() {
        let rounds = if left_out.len() == 1 {
            "round"
        } else {
            "rounds"
        };
        text.push_str(&format!(
            "  ({rounds} {} left out: a run it needs did not finish or gave no figure)",
            left_out.join(", ")
        ));
    }
    text
}
