use std::ops::Range;

/// A 1-based position in the policy source, kept on parsed items so that
/// errors found later (in `compile`) can still name the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    pub line: usize,
    pub col: usize,
}

impl Location {
    /// Converts a byte offset into `text` to line:col (col counts chars, so
    /// non-ASCII names do not shift the caret). Offsets past the end clamp.
    pub fn from_offset(text: &str, offset: usize) -> Location {
        let mut end = offset.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let before = &text[..end];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        Location { line, col }
    }
}

/// Why a policy was refused. Renders as `FILE:LINE:COL: REASON` so editors and
/// CI logs can jump to the spot; a running daemon keeps its old policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{file}:{line}:{col}: {reason}")]
    Invalid {
        file: String,
        line: usize,
        col: usize,
        reason: String,
    },
    #[error("{file}: cannot read policy: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

impl PolicyError {
    pub(super) fn at(file: &str, loc: Location, reason: impl Into<String>) -> PolicyError {
        PolicyError::Invalid {
            file: file.to_string(),
            line: loc.line,
            col: loc.col,
            reason: reason.into(),
        }
    }

    pub(super) fn at_span(
        file: &str,
        text: &str,
        span: Range<usize>,
        reason: impl Into<String>,
    ) -> PolicyError {
        PolicyError::at(file, Location::from_offset(text, span.start), reason)
    }

    /// The location of the error in the source, when it has one.
    pub fn location(&self) -> Option<Location> {
        match self {
            PolicyError::Invalid { line, col, .. } => Some(Location {
                line: *line,
                col: *col,
            }),
            PolicyError::Io { .. } => None,
        }
    }
}
