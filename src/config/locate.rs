//! Finds the line of a YAML path, so that validation errors found after
//! deserialising (a zero limit, an unknown upstream) still point at a line.
//!
//! serde forgets where values came from; this walks the parser's events once
//! and records the line where every mapping key and sequence item starts.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span, SpannedEventReceiver};

/// Line numbers (1-based) by YAML path: `tiers.pro.rate_limits.requests`,
/// `routes[2].path`.
#[derive(Debug, Default)]
pub struct Lines(HashMap<String, usize>);

impl Lines {
    /// Indexes `text`; a text that does not parse yields an empty index.
    pub fn index(text: &str) -> Lines {
        let mut walker = Walker::default();
        if Parser::new_from_str(text).load(&mut walker, false).is_err() {
            return Lines::default();
        }
        Lines(walker.lines)
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.0.get(path) {
                return Some(*line);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, index: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
}

impl Walker {
    /// The path of the value that starts now, consuming the pending key or
    /// sequence slot of the enclosing container.
    fn value_path(&mut self, line: usize) -> String {
        match self.stack.last_mut() {
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => join(path, &k),
                None => path.clone(),
            },
            Some(Frame::Seq { path, index }) => {
                let p = format!("{path}[{index}]");
                *index += 1;
                self.lines.entry(p.clone()).or_insert(line);
                p
            }
            None => String::new(),
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'input> SpannedEventReceiver<'input> for Walker {
    fn on_event(&mut self, ev: Event<'input>, span: Span) {
        let line = span.start.line();
        match ev {
            Event::MappingStart(..) => {
                let path = self.value_path(line);
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.value_path(line);
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map { path, key }) = self.stack.last_mut() {
                    if key.is_none() {
                        let full = join(path, &value);
                        self.lines.entry(full).or_insert(line);
                        *key = Some(value.into_owned());
                        return;
                    }
                }
                self.value_path(line);
            }
            Event::Alias(_) => {
                self.value_path(line);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_sequence_items() {
        let text = "tiers:\n  pro:\n    rate_limits:\n      requests: { limit: 0, window: 60s }\nroutes:\n  - name: a\n    path: /a\n  - name: b\n    path: /b\n";
        let lines = Lines::index(text);
        assert_eq!(lines.line("tiers.pro"), Some(2));
        assert_eq!(lines.line("tiers.pro.rate_limits.requests.limit"), Some(4));
        assert_eq!(lines.line("routes[1]"), Some(8));
        assert_eq!(lines.line("routes[1].path"), Some(9));
        // Unknown leaves fall back to their nearest known ancestor.
        assert_eq!(lines.line("routes[1].nothing"), Some(8));
        assert_eq!(lines.line("elsewhere"), None);
    }
}
