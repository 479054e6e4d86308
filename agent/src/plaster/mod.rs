//! Measuring the seven PLASTER properties: the report and its parts, latency recording, load
//! scenarios, accuracy, and the energy seam the sensors plug into.

pub mod accuracy;
pub mod energy;
pub mod latency;
pub mod report;
pub mod scenario;

pub use report::Report;
