//! Ordering of plugin version strings, so `plugins install` can tell an update from a
//! downgrade.
//!
//! Versions are free-form in `plugin.toml`; this orders the common shapes sensibly: dotted
//! numbers compare numerically (`1.10 > 1.9`), a missing part counts as 0 (`1.0 == 1.0.0`), a
//! pre-release sorts before its release (`1.0.0-rc.1 < 1.0.0`, as in SemVer), and build
//! metadata after `+` is ignored. Non-numeric parts compare as text.

use std::cmp::Ordering;

/// Compares two version strings (see the module docs).
pub fn compare(a: &str, b: &str) -> Ordering {
    let (a_release, a_pre) = split(a);
    let (b_release, b_pre) = split(b);
    compare_parts(a_release, b_release).then_with(|| match (a_pre, b_pre) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        (Some(x), Some(y)) => compare_parts(x, y),
    })
}

/// `release[-pre][+build]` -> (release, pre).
fn split(v: &str) -> (&str, Option<&str>) {
    let v = v.trim();
    let v = v.strip_prefix('v').unwrap_or(v);
    let v = v.split('+').next().unwrap_or(v);
    match v.split_once('-') {
        Some((release, pre)) => (release, Some(pre)),
        None => (v, None),
    }
}

fn compare_parts(a: &str, b: &str) -> Ordering {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (None, None) => return Ordering::Equal,
            (x, y) => {
                let order = compare_part(x.unwrap_or("0"), y.unwrap_or("0"));
                if order != Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

fn compare_part(a: &str, b: &str) -> Ordering {
    match (a.parse::<u64>(), b.parse::<u64>()) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        // As in SemVer, numeric identifiers sort before alphanumeric ones.
        (Ok(_), Err(_)) => Ordering::Less,
        (Err(_), Ok(_)) => Ordering::Greater,
        (Err(_), Err(_)) => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn orders_common_version_shapes() {
        for (a, b, want) in [
            ("1.0.0", "1.0.0", Equal),
            ("1.0", "1.0.0", Equal),
            ("1.10.0", "1.9.0", Greater),
            ("0.2.0", "0.10.0", Less),
            ("2", "1.99", Greater),
            ("1.0.0-rc.1", "1.0.0", Less),
            ("1.0.0-rc.2", "1.0.0-rc.10", Less),
            ("1.0.0-alpha", "1.0.0-beta", Less),
            ("1.0.0+build.5", "1.0.0+build.9", Equal),
            ("v1.2", "1.1", Greater),
            ("2024.01", "2023.12", Greater),
        ] {
            assert_eq!(compare(a, b), want, "{a} vs {b}");
            assert_eq!(compare(b, a), want.reverse(), "{b} vs {a}");
        }
    }
}
