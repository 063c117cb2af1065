//! Sources other than the MQTT front door: records read by the agent itself.
//!
//! - [`file`](mod@file): tails files, one record per line, following rotation and truncation, its
//!   position committed with the lines it read;
//! - [`mqtt`]: subscribes to an upstream broker, acknowledging there only what is committed.

pub mod file;
pub mod mqtt;
