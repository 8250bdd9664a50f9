//! Where each field of a YAML file is written: maps field paths
//! (`routes[1].green_weight`) to lines, so that validation errors can name the line.

use std::collections::HashMap;

/// Maps field paths (`routes[1].green_weight`) to the line they are written on.
///
/// A small indentation scanner over block-style YAML, enough for config files as people
/// write them. A path inside a flow collection (`{a: 1}`) maps to the line of the
/// nearest enclosing block entry.
#[derive(Debug)]
pub(super) struct LineIndex {
    lines: HashMap<String, usize>,
}

impl LineIndex {
    pub(super) fn new(text: &str) -> Self {
        enum Seg {
            Key(String),
            Item(usize),
        }
        let mut stack: Vec<(usize, Seg)> = Vec::new();
        let mut lines = HashMap::new();
        let path_of = |stack: &[(usize, Seg)]| {
            let mut p = String::new();
            for (_, seg) in stack {
                match seg {
                    Seg::Key(k) => {
                        if !p.is_empty() {
                            p.push('.');
                        }
                        p.push_str(k);
                    }
                    Seg::Item(i) => p.push_str(&format!("[{i}]")),
                }
            }
            p
        };
        for (n, raw) in text.lines().enumerate() {
            let line_no = n + 1;
            let trimmed = raw.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with("---") {
                continue;
            }
            let mut indent = raw.len() - trimmed.len();
            let mut rest = trimmed;
            while rest == "-" || rest.starts_with("- ") {
                while stack.last().is_some_and(|(i, _)| *i > indent) {
                    stack.pop();
                }
                let index = match stack.last() {
                    Some((i, Seg::Item(k))) if *i == indent => {
                        let next = k + 1;
                        stack.pop();
                        next
                    }
                    _ => 0,
                };
                stack.push((indent, Seg::Item(index)));
                lines.entry(path_of(&stack)).or_insert(line_no);
                let after = rest[1..].trim_start();
                indent += rest.len() - after.len();
                rest = after;
            }
            if let Some(key) = block_key(rest) {
                while stack.last().is_some_and(|(i, _)| *i >= indent) {
                    stack.pop();
                }
                stack.push((indent, Seg::Key(key)));
                lines.entry(path_of(&stack)).or_insert(line_no);
            }
        }
        Self { lines }
    }

    /// The line of `path`, or of its nearest ancestor that the scanner saw.
    pub(super) fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.lines.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

/// The first line at which `text` nests deeper than `max` levels (block indentation,
/// `- ` items and flow brackets together), in one linear pass; None when it does not.
pub(super) fn deeper_than(text: &str, max: usize) -> Option<usize> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (n, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = raw.len() - trimmed.len();
        if flow == 0 {
            while indents.last().is_some_and(|i| *i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut rest = trimmed;
        let mut items = 0;
        while rest == "-" || rest.starts_with("- ") {
            items += 1;
            rest = rest[1..].trim_start();
        }
        let mut deepest = flow;
        let mut quote = None;
        let mut previous = ' ';
        for c in rest.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if previous.is_whitespace() => break,
                (None, '[' | '{') => {
                    flow += 1;
                    deepest = deepest.max(flow);
                }
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            previous = c;
        }
        if indents.len() + items + deepest > max {
            return Some(n + 1);
        }
    }
    None
}

/// The key of a `key: value` or `key:` line, unquoted; None for anything else.
fn block_key(rest: &str) -> Option<String> {
    if rest.starts_with(['{', '[', '#']) {
        return None;
    }
    let (key, after) = if let Some(quoted) = rest.strip_prefix('"') {
        let end = quoted.find('"')?;
        (&quoted[..end], &quoted[end + 1..])
    } else if let Some(quoted) = rest.strip_prefix('\'') {
        let end = quoted.find('\'')?;
        (&quoted[..end], &quoted[end + 1..])
    } else {
        let colon = rest
            .find(": ")
            .or_else(|| rest.strip_suffix(':').map(|s| s.len()))?;
        (&rest[..colon], &rest[colon..])
    };
    if after.starts_with(':') && (after.len() == 1 || after[1..].starts_with([' ', '\t'])) {
        Some(key.trim().to_string())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_depth_is_bounded_in_one_pass() {
        assert_eq!(deeper_than("a:\n  b:\n    c: [1, {d: 2}]\n", 5), None);
        assert_eq!(deeper_than("a:\n  b:\n    c: [1, {d: 2}]\n", 4), Some(3));
        assert_eq!(deeper_than("a: '[[[['\nb: 1 # [[[[\n", 2), None);
        assert_eq!(deeper_than("- - - - x\n", 3), Some(1));
        // 60,000 levels of flow nesting: refused at once, in linear time.
        let deep = format!("a: {}{}\n", "[".repeat(60_000), "]".repeat(60_000));
        assert_eq!(deeper_than(&deep, 32), Some(1));
        let blocks: String = (0..2_000)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert_eq!(deeper_than(&blocks, 32), Some(33));
    }

    #[test]
    fn line_index_follows_compact_and_nested_sequences() {
        let idx = LineIndex::new("a:\n- x: 1\n  y: 2\n- x: 3\nb:\n  c:\n    - 1\n    - 2\n");
        assert_eq!(idx.line_of("a[0].x"), Some(2));
        assert_eq!(idx.line_of("a[0].y"), Some(3));
        assert_eq!(idx.line_of("a[1].x"), Some(4));
        assert_eq!(idx.line_of("b.c[1]"), Some(8));
        assert_eq!(idx.line_of("b.c[1].deeper"), Some(8));
        assert_eq!(idx.line_of("zzz"), None);
    }
}
