//! The formats of the `timestamp` stage, as the agent will parse them. Checking a format
//! here is building it: the agent parses with the value [`TimeFormat::new`] returns.

use chrono::format::{Item, StrftimeItems};

#[derive(Clone, Debug, PartialEq)]
pub enum TimeFormat {
    /// RFC3339 with or without fraction digits (`RFC3339` and `RFC3339Nano`, as in Go).
    Rfc3339,
    /// Seconds, optionally with a fraction: `1562708916` or `1562708916.414123`.
    Unix,
    UnixMs,
    UnixUs,
    UnixNs,
    Strftime(String),
}

impl TimeFormat {
    pub fn new(name: &str) -> Result<Self, String> {
        Ok(match name {
            "RFC3339" | "RFC3339Nano" => Self::Rfc3339,
            "Unix" => Self::Unix,
            "UnixMs" => Self::UnixMs,
            "UnixUs" => Self::UnixUs,
            "UnixNs" => Self::UnixNs,
            "" => return Err("format must not be empty".into()),
            custom => {
                if StrftimeItems::new(custom).any(|item| matches!(item, Item::Error)) {
                    return Err(format!("invalid strftime format {custom:?}"));
                }
                Self::Strftime(custom.to_string())
            }
        })
    }
}
