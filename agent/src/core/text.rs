//! Text from other nodes or users, made safe to show: nothing here may hold a terminal escape or
//! break a log line. Pure.

/// Text from the network made fit for a terminal and a log line: control characters (terminal
/// escapes, carriage returns, new lines) become `?`, and it is cut after `max_chars` characters.
pub fn printable(text: &str, max_chars: usize) -> String {
    let mut out: String = text.chars().take(max_chars).map(|c| if c.is_control() { '?' } else { c }).collect();
    if text.chars().nth(max_chars).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_question_marks_and_long_text_is_cut() {
        assert_eq!(printable("a\u{1b}[31mb\r\nc", 100), "a?[31mb??c");
        assert_eq!(printable("n\u{e9}ud", 100), "n\u{e9}ud", "letters beyond ASCII stay");
        assert_eq!(printable("abcdef", 3), "abc...");
        assert_eq!(printable("abc", 3), "abc");
    }
}
