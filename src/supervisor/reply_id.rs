//! The rule for a response's id, shared by the instance and `plugins test`: a plugin must echo
//! the request's id unchanged, with the same JSON type. The worker's ids are numbers, so a
//! string id can never match; it is a protocol violation, reported in words that say how to fix
//! it rather than as a response that matches nothing (which would leave its task waiting).

/// The violation message for a response carrying the string `id`, given the method of the
/// request it seems to answer (when the string holds that request's number).
pub fn string_id_violation(id: &str, method: Option<&str>) -> String {
    let answered = match method {
        Some(m) => format!("answered {m}"),
        None => "sent a response".to_string(),
    };
    let fix = match id.trim().parse::<u64>() {
        Ok(n) => format!("echo the request's id unchanged, same JSON type (the number {n})"),
        Err(_) => "echo the request's id unchanged, same JSON type (the worker's ids are numbers)"
            .to_string(),
    };
    format!("broke the protocol: {answered} with id {id:?} (a string); {fix}")
}

/// The request number a string id stands for, if it is one written as a string.
pub fn meant(id: &str) -> Option<u64> {
    id.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_says_what_was_wrong_and_how_to_fix_it() {
        assert_eq!(
            string_id_violation("2", Some("task.run")),
            "broke the protocol: answered task.run with id \"2\" (a string); echo the request's id unchanged, same JSON type (the number 2)"
        );
        assert!(string_id_violation("abc", None)
            .starts_with("broke the protocol: sent a response with id \"abc\""));
        assert_eq!(meant(" 7"), Some(7));
        assert_eq!(meant("x"), None);
    }
}
