//! `plaster-agent push` and `plaster-agent rollback`: the operator's side of PROTOCOL.md's
//! push. `push` builds the bundle (from an `.onnx` plus `--dataset`, a bundle directory, or a
//! ready `.tar`), checks it with the device's own rules, signs its manifest, sends manifest and
//! chunks at QoS 1 with a progress bar, re-sends the ranges a device reports missing, waits for
//! every target's final event and prints one row per device. Exit 1 if any target did not
//! activate it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signer, SigningKey};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rumqttc::{AsyncClient, Event, Packet, QoS};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::config::BrokerUrl;
use crate::inference::ModelSource;
use crate::mqtt::options::MqttError;
use crate::mqtt::topics::{Topics, ALL_DEVICES};
use crate::ota::bundle::{self, MEMBERS};
use crate::ota::wire::{self, Chunk, Command, Manifest, PushMessage, SignedManifest};
use crate::telemetry::record::{self, rfc3339, UpdateEvent};

/// `--all` takes the devices whose retained status says online, gathered this long.
const DISCOVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// The broker: mqtt://HOST:PORT or mqtts://HOST:PORT
    #[arg(long, value_name = "URL", value_parser = BrokerUrl::parse)]
    pub broker: BrokerUrl,
    /// The fleet (the topic level plaster/v1/<fleet>/...)
    #[arg(long, value_name = "F")]
    pub fleet: String,
    /// Target device(s); repeat for several
    #[arg(
        long = "device",
        value_name = "ID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub devices: Vec<String>,
    /// Every online device of the fleet (one message to the fleet's topic)
    #[arg(long)]
    pub all: bool,
    /// The Ed25519 private key (PKCS#8 PEM, from `plaster-agent keygen`)
    #[arg(long, value_name = "KEY")]
    pub key: PathBuf,
    /// The key id devices know the key by [default: the key file's name without .key]
    #[arg(long, value_name = "ID")]
    pub key_id: Option<String>,
    /// Give up waiting for a device's result after this many seconds
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub timeout: u64,
    #[command(flatten)]
    pub login: super::BrokerLogin,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PushArgs {
    /// An .onnx file, a bundle directory, or a bundle .tar
    #[arg(value_name = "MODEL_OR_BUNDLE")]
    pub model: PathBuf,
    /// The version to install; devices accept only versions newer than their active one
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub version: u64,
    /// Labelled NPZ validation set to bundle as dataset.npz (the devices' accuracy gate)
    #[arg(long, value_name = "NPZ")]
    pub dataset: Option<PathBuf>,
    /// Devices refuse the model when its top-1 on the bundled dataset is below this
    #[arg(long, value_name = "X")]
    pub min_accuracy: Option<f64>,
    /// The model's name [default: the file's or directory's name]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Notes carried in the manifest
    #[arg(long, value_name = "TEXT")]
    pub notes: Option<String>,
    /// Chunk size in bytes
    #[arg(long, value_name = "BYTES", default_value_t = wire::DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u64,
    #[command(flatten)]
    pub target: BrokerArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RollbackArgs {
    /// The version to roll back from (it must be the active one on the device)
    #[arg(long, value_name = "N")]
    pub version: u64,
    #[command(flatten)]
    pub target: BrokerArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    #[error("--key {}: {message}", path.display())]
    Key { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error("mqtt {broker}: {message}")]
    Broker { broker: String, message: String },
    #[error("--all: no online device in fleet {0:?} (no retained status says online)")]
    NoDevices(String),
    #[error("{failed} of {total} device(s) did not activate version {version}")]
    Failed {
        failed: usize,
        total: usize,
        version: u64,
    },
    #[error("{failed} of {total} device(s) did not roll back version {version}")]
    RollbackFailed {
        failed: usize,
        total: usize,
        version: u64,
    },
    #[error("writing to stdout: {0}")]
    Output(std::io::Error),
    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, PushError> {
    std::fs::read(path).map_err(|e| PushError::Input {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The bundle's bytes and its default name: a `.tar`'s file stem, else the name the agent
/// itself gives the model (`ModelSource`: a bundle directory's name, a file's stem, or the
/// directory of a `model.onnx`).
pub fn build_bundle(model: &Path, dataset: Option<&Path>) -> Result<(Vec<u8>, String), PushError> {
    let is_tar = model.extension().is_some_and(|e| e == "tar");
    let bytes = if model.is_dir() {
        let mut members = Vec::new();
        for member in MEMBERS {
            let path = model.join(member);
            if member == "dataset.npz" && dataset.is_some() {
                continue;
            }
            if path.is_file() {
                members.push((member, read(&path)?));
            }
        }
        if let Some(dataset) = dataset {
            members.push(("dataset.npz", read(dataset)?));
        }
        bundle::build(&members).map_err(|e| PushError::Invalid(e.to_string()))?
    } else if is_tar {
        if dataset.is_some() {
            return Err(PushError::Invalid(
                "--dataset cannot be added to a ready .tar bundle (put dataset.npz in it)".into(),
            ));
        }
        read(model)?
    } else {
        let mut members = vec![("model.onnx", read(model)?)];
        if let Some(dataset) = dataset {
            members.push(("dataset.npz", read(dataset)?));
        }
        bundle::build(&members).map_err(|e| PushError::Invalid(e.to_string()))?
    };
    // The devices' own rules, before anything is sent.
    let input_error = |message: String| PushError::Input {
        path: model.to_path_buf(),
        message,
    };
    bundle::check(bytes.as_slice(), bytes.len() as u64).map_err(|e| input_error(e.to_string()))?;
    let name = if is_tar {
        model
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("model")
            .to_string()
    } else {
        ModelSource::resolve(model)
            .map_err(|e| input_error(e.to_string()))?
            .name
    };
    Ok((bytes, name))
}

fn signing_key(args: &BrokerArgs) -> Result<(SigningKey, String), PushError> {
    let pem = std::fs::read_to_string(&args.key).map_err(|e| PushError::Key {
        path: args.key.clone(),
        message: e.to_string(),
    })?;
    let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| PushError::Key {
        path: args.key.clone(),
        message: format!("not an Ed25519 PKCS#8 PEM private key ({e})"),
    })?;
    let key_id = args.key_id.clone().unwrap_or_else(|| {
        args.key
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("key")
            .to_string()
    });
    Ok((key, key_id))
}

/// What became of one device.
#[derive(Clone, Debug, Default)]
struct Outcome {
    state: Option<String>,
    reason: Option<String>,
    event: Option<UpdateEvent>,
}

fn is_final(state: &str) -> bool {
    matches!(state, "activated" | "rejected" | "rolled_back")
}

pub fn run_push(args: &PushArgs) -> Result<(), PushError> {
    let (bundle_bytes, default_name) = build_bundle(&args.model, args.dataset.as_deref())?;
    let name = args.name.clone().unwrap_or(default_name);
    wire::check_name(&name)
        .map_err(|e| PushError::Invalid(e.replace("manifest: name", "--name")))?;
    if !(wire::MIN_CHUNK_SIZE..=wire::MAX_CHUNK_SIZE).contains(&args.chunk_size) {
        return Err(PushError::Invalid(format!(
            "--chunk-size {} is outside {}..={}",
            args.chunk_size,
            wire::MIN_CHUNK_SIZE,
            wire::MAX_CHUNK_SIZE
        )));
    }
    if let Some(min) = args.min_accuracy.filter(|m| !(0.0..=1.0).contains(m)) {
        return Err(PushError::Invalid(format!(
            "--min-accuracy {min} is outside 0..=1"
        )));
    }
    let (key, key_id) = signing_key(&args.target)?;
    let size = bundle_bytes.len() as u64;
    let manifest = Manifest {
        name: name.clone(),
        version: args.version,
        sha256: Sha256::digest(&bundle_bytes).into(),
        size,
        chunk_size: args.chunk_size,
        chunks: size.div_ceil(args.chunk_size),
        created: rfc3339(SystemTime::now()),
        min_accuracy: args.min_accuracy,
        notes: args.notes.clone(),
    };
    let manifest_bytes = wire::encode_manifest(&manifest);
    let signed = SignedManifest {
        transfer_id: rand::random(),
        signature: key.sign(&manifest_bytes).to_bytes(),
        manifest: manifest_bytes,
        key_id,
    };
    eprintln!(
        "pushing {name} v{} ({size} bytes, {} chunks of {} bytes, sha256 {}) as transfer {}",
        args.version,
        manifest.chunks,
        args.chunk_size,
        hex::encode(manifest.sha256),
        hex::encode(signed.transfer_id)
    );
    let outcomes = exchange(
        &args.target,
        Outgoing::Push {
            signed: Box::new(signed),
            manifest: Box::new(manifest),
            bundle: Arc::new(bundle_bytes),
        },
    )?;
    report(&outcomes, "activated", |failed, total| PushError::Failed {
        failed,
        total,
        version: args.version,
    })
}

pub fn run_rollback(args: &RollbackArgs) -> Result<(), PushError> {
    let (key, key_id) = signing_key(&args.target)?;
    let command = Command::Rollback {
        version: args.version,
        signature: key.sign(&wire::rollback_message(args.version)).to_bytes(),
        key_id,
    };
    let outcomes = exchange(
        &args.target,
        Outgoing::Command(wire::encode_command(&command), args.version),
    )?;
    report(&outcomes, "rolled_back", |failed, total| {
        PushError::RollbackFailed {
            failed,
            total,
            version: args.version,
        }
    })
}

fn report(
    outcomes: &BTreeMap<String, Outcome>,
    wanted: &str,
    error: impl FnOnce(usize, usize) -> PushError,
) -> Result<(), PushError> {
    let mut table = super::table(vec!["device", "result", "reason / figures"]);
    let mut failed = 0;
    for (device, outcome) in outcomes {
        let state = outcome
            .state
            .clone()
            .unwrap_or_else(|| "no result (timed out)".into());
        if state != wanted {
            failed += 1;
        }
        let detail = match (&outcome.reason, &outcome.event) {
            (Some(reason), _) => reason.clone(),
            (
                None,
                Some(UpdateEvent {
                    metrics: Some(m), ..
                }),
            ) => {
                let accuracy = m
                    .accuracy
                    .as_ref()
                    .map(|a| format!("top-1 {:.4}", a.value))
                    .unwrap_or_else(|| "no dataset".into());
                let push = m
                    .learning
                    .push_to_active_s
                    .map(|s| format!(", push-to-active {s:.2} s"))
                    .unwrap_or_default();
                format!(
                    "{} v{} on {}, {accuracy}{push}",
                    m.model.name,
                    m.model.version.unwrap_or(0),
                    m.device.runtime
                )
            }
            _ => String::new(),
        };
        table.add_row(vec![device.clone(), state, detail]);
    }
    super::write_stdout(&format!("{table}\n")).map_err(PushError::Output)?;
    if failed > 0 {
        return Err(error(failed, outcomes.len()));
    }
    Ok(())
}

/// Publishes at QoS 1 (waiting for room in the client's queue); false once the client is gone.
async fn send(client: &AsyncClient, topic: &str, bytes: Vec<u8>) -> bool {
    client
        .publish(topic, QoS::AtLeastOnce, false, bytes)
        .await
        .is_ok()
}

enum Outgoing {
    Push {
        signed: Box<SignedManifest>,
        manifest: Box<Manifest>,
        bundle: Arc<Vec<u8>>,
    },
    /// A command's bytes and the version it names.
    Command(Vec<u8>, u64),
}

/// Connects, finds the targets, sends, answers resend requests, and collects every target's
/// final event.
fn exchange(args: &BrokerArgs, outgoing: Outgoing) -> Result<BTreeMap<String, Outcome>, PushError> {
    let connection = args.login.connection();
    let client_id = format!("plaster-push-{}", hex::encode(rand::random::<[u8; 6]>()));
    let options = connection.options(&args.broker, &client_id, Duration::from_secs(30), true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(PushError::Runtime)?;
    let broker = args.broker.to_string();
    let broker_error = |message: String| PushError::Broker {
        broker: broker.clone(),
        message,
    };
    runtime.block_on(async {
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let fleet = &args.fleet;
        // Subscribe to results (and, for --all, to who is online) before sending anything.
        let [events_filter, status_filter] = Topics::fleet_updates(fleet);
        let mut filters = vec![events_filter];
        if args.all {
            filters.push(status_filter);
        }
        let mut outcomes: BTreeMap<String, Outcome> = args
            .devices
            .iter()
            .map(|d| (d.clone(), Outcome::default()))
            .collect();
        let mut subacks = 0;
        let mut discovery_until: Option<tokio::time::Instant> = None;
        // Wait for the subscriptions (and the retained statuses for --all).
        loop {
            let event = match discovery_until {
                Some(until) => match tokio::time::timeout_at(until, eventloop.poll()).await {
                    Ok(event) => event,
                    Err(_) => break,
                },
                None => eventloop.poll().await,
            };
            match event.map_err(|e| broker_error(e.to_string()))? {
                Event::Incoming(Packet::ConnAck(_)) => {
                    for filter in &filters {
                        client
                            .subscribe(filter.clone(), QoS::AtLeastOnce)
                            .await
                            .map_err(|e| broker_error(e.to_string()))?;
                    }
                }
                Event::Incoming(Packet::SubAck(_)) => {
                    subacks += 1;
                    if subacks == filters.len() {
                        if !args.all {
                            break;
                        }
                        discovery_until = Some(tokio::time::Instant::now() + DISCOVERY);
                    }
                }
                Event::Incoming(Packet::Publish(p)) if p.topic.ends_with("/status") => {
                    let device = Topics::device_of(&p.topic).unwrap_or_default().to_string();
                    let online = record::decode::<serde_json::Value>(
                        &p.payload,
                        record::encoding_of(&p.payload),
                    )
                    .ok()
                    .and_then(|v| v.get("online").and_then(|o| o.as_bool()))
                        == Some(true);
                    if online {
                        outcomes.entry(device).or_default();
                    } else {
                        outcomes.remove(&device);
                    }
                }
                _ => {}
            }
        }
        if outcomes.is_empty() {
            return Err(PushError::NoDevices(fleet.clone()));
        }
        let devices: Vec<String> = outcomes.keys().cloned().collect();
        eprintln!("targets: {}", devices.join(", "));
        // Index 0: the device's own topic; 1: the fleet's.
        let addressed = |device: &str| Topics::new(fleet, device);

        // The sender task publishes (awaiting the client's queue) while this loop polls.
        let (resend_tx, mut resend_rx) = mpsc::unbounded_channel::<(String, Vec<u64>)>();
        let (transfer_id, version, total_bytes) = match &outgoing {
            Outgoing::Push {
                signed, manifest, ..
            } => (Some(signed.transfer_id), manifest.version, manifest.size),
            Outgoing::Command(_, version) => (None, *version, 0),
        };
        let bar =
            ProgressBar::with_draw_target(Some(total_bytes.max(1)), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix("sending");
        let sender = {
            let client = client.clone();
            let bar = bar.clone();
            let all = args.all;
            let devices = devices.clone();
            // (push topic, command topic) per destination.
            let targets: Vec<(String, String)> = if all {
                let t = addressed(ALL_DEVICES);
                vec![(t.model_push()[0].clone(), t.cmd()[0].clone())]
            } else {
                devices
                    .iter()
                    .map(|d| {
                        let t = addressed(d);
                        (t.model_push()[0].clone(), t.cmd()[0].clone())
                    })
                    .collect()
            };
            let fleet = fleet.clone();
            let push_topic_of =
                move |device: &str| Topics::new(&fleet, device).model_push()[0].clone();
            tokio::spawn(async move {
                match outgoing {
                    Outgoing::Command(bytes, _) => {
                        for (_, cmd) in &targets {
                            send(&client, cmd, bytes.clone()).await;
                        }
                    }
                    Outgoing::Push {
                        signed,
                        manifest,
                        bundle,
                    } => {
                        let manifest_message =
                            wire::encode_push(&PushMessage::Manifest(*signed.clone()));
                        let chunk = |index: u64| {
                            let start = (index * manifest.chunk_size) as usize;
                            let end = (start + manifest.chunk_size as usize).min(bundle.len());
                            wire::encode_push(&PushMessage::Chunk(Chunk {
                                transfer_id: signed.transfer_id,
                                index,
                                data: bundle[start..end].to_vec(),
                            }))
                        };
                        for (target_ix, (topic, _)) in targets.iter().enumerate() {
                            send(&client, topic, manifest_message.clone()).await;
                            for index in 0..manifest.chunks {
                                if !send(&client, topic, chunk(index)).await {
                                    return;
                                }
                                if target_ix == 0 {
                                    let sent = manifest.size - index * manifest.chunk_size;
                                    bar.inc(manifest.chunk_size.min(sent));
                                }
                            }
                        }
                        bar.set_prefix("waiting");
                        // Devices report missing ranges after a pause or a restart.
                        while let Some((device, indices)) = resend_rx.recv().await {
                            let topic = push_topic_of(&device);
                            for index in indices {
                                send(&client, &topic, chunk(index)).await;
                            }
                        }
                    }
                }
            })
        };

        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
        let started = Instant::now();
        while outcomes
            .values()
            .any(|o| !o.state.as_deref().is_some_and(is_final))
        {
            let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(event) => event,
                Err(_) => break,
            };
            let Event::Incoming(Packet::Publish(p)) =
                event.map_err(|e| broker_error(e.to_string()))?
            else {
                continue;
            };
            if !p.topic.ends_with("/model/events") {
                continue;
            }
            let device = Topics::device_of(&p.topic).unwrap_or_default().to_string();
            let Ok(event) =
                record::decode::<UpdateEvent>(&p.payload, record::encoding_of(&p.payload))
            else {
                continue;
            };
            let ours = match transfer_id {
                Some(id) => event.transfer_id == id,
                None => {
                    event.version == version
                        && matches!(event.state.as_str(), "rolled_back" | "rejected")
                }
            };
            let Some(outcome) = outcomes.get_mut(&device).filter(|_| ours) else {
                continue;
            };
            bar.set_message(format!("{device}: {}", event.state));
            if event.state == "receiving" {
                if let Some(missing) = &event.missing {
                    let indices: Vec<u64> = missing.iter().flat_map(|[a, b]| *a..=*b).collect();
                    if !indices.is_empty() {
                        bar.println(format!(
                            "{device}: re-sending {} missing chunk(s)",
                            indices.len()
                        ));
                        let _ = resend_tx.send((device.clone(), indices));
                    }
                }
            }
            outcome.state = Some(event.state.clone());
            outcome.reason = event.reason.clone();
            outcome.event = Some(event);
        }
        bar.finish_and_clear();
        sender.abort();
        eprintln!("done in {:.2} s", started.elapsed().as_secs_f64());
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(event) = eventloop.poll().await {
                if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
        Ok(outcomes)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_from_an_onnx_file_and_a_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("resnet.onnx");
        std::fs::write(&model, b"onnx").unwrap();
        let dataset = dir.path().join("val.npz");
        std::fs::write(&dataset, b"npz").unwrap();
        let (tar, name) = build_bundle(&model, Some(&dataset)).unwrap();
        assert_eq!(name, "resnet");
        assert_eq!(
            bundle::check(tar.as_slice(), 1 << 20).unwrap(),
            vec!["model.onnx", "dataset.npz"]
        );
        let ready = dir.path().join("ready.tar");
        std::fs::write(&ready, &tar).unwrap();
        assert_eq!(build_bundle(&ready, None).unwrap().0, tar);
        std::fs::write(&ready, b"not a tar at all").unwrap();
        assert!(build_bundle(&ready, None)
            .unwrap_err()
            .to_string()
            .ends_with("ready.tar: bundle: not a tar archive: failed to read entire block"));
    }
}
