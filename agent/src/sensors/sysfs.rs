//! Reading sysfs attributes: one value per file, text, in the units the kernel documents.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::{Joules, Reading, SensorError, Watts};

pub(crate) fn read_text(path: &Path) -> Result<String, SensorError> {
    let raw = fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    non_empty(path, &raw)
}

/// The trimmed text of an attribute; an empty attribute is an error, not a value.
fn non_empty(path: &Path, raw: &str) -> Result<String, SensorError> {
    let text = raw.trim();
    if text.is_empty() {
        return Err(SensorError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(text.to_string())
}

/// A finite number; garbage and NaN/infinity are errors, never values.
fn parse_finite(path: &Path, text: String) -> Result<f64, SensorError> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(SensorError::Garbage {
            path: path.to_path_buf(),
            text,
        }),
    }
}

pub(crate) fn io_error(path: &Path, e: std::io::Error) -> SensorError {
    match e.kind() {
        ErrorKind::PermissionDenied => SensorError::PermissionDenied {
            path: path.to_path_buf(),
        },
        ErrorKind::NotFound => SensorError::Missing {
            path: path.to_path_buf(),
        },
        _ => SensorError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    }
}

/// An attribute holding a finite number.
pub(crate) fn read_number(path: &Path) -> Result<f64, SensorError> {
    parse_finite(path, read_text(path)?)
}

pub(crate) fn read_optional_text(path: &Path) -> Option<String> {
    read_text(path).ok()
}

/// Sorted entries of `dir` whose file name passes `keep` (missing directories are empty).
pub(crate) fn entries(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(read) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = read
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(&keep))
        .map(|e| e.path())
        .collect();
    paths.sort();
    paths
}

/// A sysfs attribute read at a high rate: the file stays open and each read is a positional
/// read at offset 0, which makes the kernel render the current value. Opening the path on
/// every read costs a path lookup and two more syscalls a sample. After an error the handle is
/// dropped, so the next read opens the path again.
#[derive(Debug)]
pub(crate) struct Attr {
    pub path: PathBuf,
    file: Option<fs::File>,
}

impl Attr {
    pub(crate) fn new(path: PathBuf) -> Attr {
        Attr { path, file: None }
    }

    pub(crate) fn number(&mut self) -> Result<f64, SensorError> {
        let result = self.read_fresh();
        if result.is_err() {
            self.file = None;
        }
        result
    }

    fn read_fresh(&mut self) -> Result<f64, SensorError> {
        use std::os::unix::fs::FileExt;
        let file = match &self.file {
            Some(file) => file,
            None => self
                .file
                .insert(fs::File::open(&self.path).map_err(|e| io_error(&self.path, e))?),
        };
        let mut buf = [0u8; 64];
        let n = file
            .read_at(&mut buf, 0)
            .map_err(|e| io_error(&self.path, e))?;
        let text = non_empty(&self.path, &String::from_utf8_lossy(&buf[..n]))?;
        parse_finite(&self.path, text)
    }
}

/// How a channel turns files into a reading.
#[derive(Debug)]
pub(crate) enum Probe {
    /// Bus voltage in millivolts and current in milliamps (INA3221): P = mV x mA / 1e6 W.
    VoltageCurrent { millivolts: Attr, milliamps: Attr },
    /// A power attribute, scaled to watts (iio mW: 1e-3; INA238 and batteries µW: 1e-6).
    Power { attr: Attr, watts_per_unit: f64 },
    /// A cumulative energy counter scaled to joules (µJ: 1e-6), wrapping at `wrap` units.
    Counter {
        attr: Attr,
        joules_per_unit: f64,
        wrap: Option<f64>,
    },
}

impl Probe {
    pub(crate) fn voltage_current(millivolts: PathBuf, milliamps: PathBuf) -> Probe {
        Probe::VoltageCurrent {
            millivolts: Attr::new(millivolts),
            milliamps: Attr::new(milliamps),
        }
    }

    pub(crate) fn power(path: PathBuf, watts_per_unit: f64) -> Probe {
        Probe::Power {
            attr: Attr::new(path),
            watts_per_unit,
        }
    }

    pub(crate) fn counter(path: PathBuf, joules_per_unit: f64, wrap: Option<f64>) -> Probe {
        Probe::Counter {
            attr: Attr::new(path),
            joules_per_unit,
            wrap,
        }
    }

    /// Reads the channel; power above `limit` is rejected as implausible (a sensor glitch or
    /// a wrong unit), never reported.
    pub(crate) fn read(&mut self, limit: Watts) -> Result<Reading, SensorError> {
        match self {
            Probe::VoltageCurrent {
                millivolts,
                milliamps,
            } => {
                let mv = millivolts.number()?;
                let ma = milliamps.number()?;
                check_power(Watts((mv * ma).abs() / 1e6), limit, &milliamps.path)
            }
            Probe::Power {
                attr,
                watts_per_unit,
            } => {
                let raw = attr.number()?;
                check_power(Watts(raw.abs() * *watts_per_unit), limit, &attr.path)
            }
            Probe::Counter {
                attr,
                joules_per_unit,
                wrap,
            } => {
                let raw = attr.number()?;
                if raw < 0.0 {
                    return Err(SensorError::Implausible {
                        what: format!("energy counter {}", attr.path.display()),
                        value: format!("{raw}"),
                        limit: "0 or more".into(),
                    });
                }
                Ok(Reading::Counter {
                    total: Joules(raw * *joules_per_unit),
                    wrap: wrap.map(|w| Joules(w * *joules_per_unit)),
                })
            }
        }
    }
}

pub(crate) fn check_power(power: Watts, limit: Watts, path: &Path) -> Result<Reading, SensorError> {
    if power.0 > limit.0 {
        return Err(SensorError::Implausible {
            what: format!("power from {}", path.display()),
            value: format!("{:.1} W", power.0),
            limit: format!("{:.0} W", limit.0),
        });
    }
    Ok(Reading::Power(power))
}

/// A source made of sysfs channels: Jetson power monitors, RAPL domains, hwmon counters.
#[derive(Debug)]
pub(crate) struct RailSource {
    pub name: String,
    pub kind: super::SourceKind,
    pub rails: Vec<(String, Probe)>,
    /// Indices into `rails` whose sum is the total.
    pub total: Vec<usize>,
    pub update_interval: Option<std::time::Duration>,
    /// Highest plausible power of one channel of this kind of device.
    pub limit: Watts,
}

impl super::EnergySource for RailSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> super::SourceKind {
        self.kind
    }

    fn update_interval(&self) -> Option<std::time::Duration> {
        self.update_interval
    }

    fn read_total(&mut self) -> Result<Vec<Reading>, SensorError> {
        let limit = self.limit;
        let rails = &mut self.rails;
        self.total
            .iter()
            .map(|&ix| rails[ix].1.read(limit))
            .collect()
    }

    fn read_rails(&mut self) -> Vec<(String, Result<Reading, SensorError>)> {
        let limit = self.limit;
        self.rails
            .iter_mut()
            .map(|(name, probe)| (name.clone(), probe.read(limit)))
            .collect()
    }
}

/// `update_interval` of a hwmon device, in milliseconds.
pub(crate) fn update_interval(dir: &Path) -> Option<std::time::Duration> {
    let ms = read_number(&dir.join("update_interval")).ok()?;
    (ms > 0.0).then(|| std::time::Duration::from_secs_f64(ms / 1e3))
}
