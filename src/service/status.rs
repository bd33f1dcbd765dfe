//! What the service reports about itself: one [`Status`] value, written atomically to
//! `status.json` in the state folder, rendered as Prometheus text, and optionally served on a
//! localhost port for scrapers.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use serde::Serialize;

/// The service's numbers at one moment. Field names are the status.json keys and, prefixed with
/// `dinostream_`, the Prometheus metric names.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Status {
    /// Optimizer steps done.
    pub step: u64,
    /// The last loss read (null until the trainer read one: every `train.log_every_steps` steps).
    pub loss: Option<f64>,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Teacher EMA momentum of the last step.
    pub momentum: f64,
    /// Training samples per second over the last reporting interval.
    pub samples_per_sec: f64,
    /// Share of the last reporting interval spent in training steps (held near
    /// `serve.duty_cycle` while there is work; lower while idle).
    pub busy_fraction: f64,
    /// Steps whose batch held fresh patches (the rest replayed), since the first start.
    pub fresh_steps: u64,
    /// Steps on replay-only batches (rehearsal between arrivals), since the first start.
    pub replay_only_steps: u64,
    /// Patches waiting for augmentation.
    pub patch_queue: usize,
    /// Ready batches waiting for the trainer.
    pub batch_queue: usize,
    /// Patches in the replay buffer.
    pub replay_patches: usize,
    /// Bytes of the replay store on disk (referenced patches and those waiting for collection).
    pub replay_disk_bytes: u64,
    /// Replay patches that could not be written (disk full) or read back (damaged), since start.
    pub replay_store_failures: u64,
    /// The replay buffer stopped growing at `stream.replay_disk_mb`.
    pub replay_disk_full: bool,
    /// Tiles ever seen.
    pub tiles_seen: u64,
    /// Tiles trained on.
    pub tiles_trained: u64,
    /// Tiles rejected (bad files).
    pub tiles_rejected: u64,
    /// Tiles seen but not trained on yet.
    pub tiles_pending: u64,
    /// Teacher output entropy / ln K (1 = uniform collapse, near 0 = one-hot collapse).
    pub teacher_entropy_ratio: Option<f64>,
    /// KL(teacher || student), mean over rows.
    pub kl_teacher_student: Option<f64>,
    /// Std of the l2-normalised teacher cls embedding times sqrt(d) (about 1 when healthy, 0 collapsed).
    pub teacher_embedding_std_ratio: Option<f64>,
    /// Files rejected without a ledger entry: unreadable ones, FIFOs, sockets, devices, broken
    /// symbolic links, copies of known tiles (each path once per reason).
    pub files_refused: u64,
    /// Checkpoint attempts that failed since the last one written (0: healthy; more: degraded,
    /// see `checkpoint_error`).
    pub checkpoint_failures: u64,
    /// Why the last checkpoint failed, while checkpoints fail.
    pub checkpoint_error: Option<String>,
    /// Steps trained since the last checkpoint written (lost if the process ends now).
    pub unsaved_steps: u64,
    /// Training is paused because checkpoints fail (`serve.pause_after_unsaved_steps`).
    pub training_paused: bool,
    /// Unix time of this report, seconds.
    pub updated_unix_secs: u64,
}

impl Status {
    /// Write `status.json` into `dir` atomically.
    pub fn write_json(&self, dir: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("Status serialises to JSON");
        crate::fsio::write_atomic(&dir.join("status.json"), &json)
    }

    /// The periodic log line.
    pub fn line(&self) -> String {
        format!(
            "step {} loss {} lr {:.3e} momentum {:.5} {:.1} samples/s busy {:.0}% | steps fresh {} replay-only {} | queues fresh {} batches {} replay {}{} | tiles seen {} trained {} rejected {} pending {} | teacher entropy {} kl {} cls std {}{}",
            self.step,
            shown(self.loss, 4),
            self.lr,
            self.momentum,
            self.samples_per_sec,
            100.0 * self.busy_fraction,
            self.fresh_steps,
            self.replay_only_steps,
            self.patch_queue,
            self.batch_queue,
            self.replay_patches,
            if self.replay_disk_full { " (stream.replay_disk_mb full)" } else { "" },
            self.tiles_seen,
            self.tiles_trained,
            self.tiles_rejected,
            self.tiles_pending,
            shown(self.teacher_entropy_ratio, 3),
            shown(self.kl_teacher_student, 3),
            shown(self.teacher_embedding_std_ratio, 3),
            self.degraded_note(),
        )
    }

    /// The `STATUS=` line `systemctl status` shows.
    pub fn systemd_line(&self) -> String {
        format!(
            "step {}, loss {}, {} tile(s) pending, {} fresh patch(es) queued{}",
            self.step,
            shown(self.loss, 4),
            self.tiles_pending,
            self.patch_queue,
            self.degraded_note()
        )
    }

    /// ` | DEGRADED: ...` while checkpoints fail, else nothing.
    fn degraded_note(&self) -> String {
        let Some(error) = &self.checkpoint_error else { return String::new() };
        let paused = if self.training_paused { ", training paused" } else { "" };
        format!(
            " | DEGRADED: {} checkpoint attempt(s) failed, {} step(s) unsaved{paused}: {error}",
            self.checkpoint_failures, self.unsaved_steps
        )
    }

    /// Prometheus text exposition format (every numeric field as a gauge, booleans as 0/1; unset
    /// values omitted).
    pub fn prometheus(&self) -> String {
        let value = serde_json::to_value(self).expect("Status serialises to JSON");
        let mut out = String::new();
        for (key, v) in value.as_object().expect("Status is a JSON object") {
            if let Some(x) = v.as_f64().or_else(|| v.as_bool().map(|b| f64::from(u8::from(b)))) {
                out.push_str(&format!("# TYPE dinostream_{key} gauge\ndinostream_{key} {x}\n"));
            }
        }
        out
    }
}

/// `v` with `decimals`, or `-` when there is none yet.
fn shown(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// Serve `GET /metrics` on `127.0.0.1:port` from a background thread until the process exits.
/// Returns the bound port (useful with port 0 in tests).
pub fn serve_metrics(port: u16, status: Arc<Mutex<Status>>) -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    let bound = listener.local_addr()?.port();
    thread::Builder::new().name("metrics".into()).spawn(move || {
        for stream in listener.incoming().flatten() {
            let body = status.lock().map(|s| s.prometheus()).unwrap_or_default();
            if let Err(e) = answer(stream, &body) {
                log::debug!("metrics request failed: {e}");
            }
        }
    })?;
    Ok(bound)
}

fn answer(mut stream: TcpStream, body: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut request_line = String::new();
    BufReader::new(&stream).read_line(&mut request_line)?;
    let (code, body) = if request_line.starts_with("GET /metrics") {
        ("200 OK", body)
    } else {
        ("404 Not Found", "try GET /metrics\n")
    };
    write!(
        stream,
        "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample() -> Status {
        Status {
            step: 42,
            loss: Some(7.5),
            tiles_rejected: 3,
            kl_teacher_student: Some(0.25),
            fresh_steps: 5,
            replay_only_steps: 37,
            busy_fraction: 0.5,
            ..Status::default()
        }
    }

    #[test]
    fn status_json_is_written_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        sample().write_json(dir.path()).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("status.json")).unwrap()).unwrap();
        assert_eq!(v["step"], 42);
        assert_eq!(v["tiles_rejected"], 3);
        assert!(v["teacher_entropy_ratio"].is_null());
    }

    #[test]
    fn before_the_first_loss_is_read_no_loss_is_shown() {
        let fresh = Status { step: 1, ..Status::default() };
        let json = serde_json::to_value(&fresh).unwrap();
        assert!(json["loss"].is_null(), "{json}");
        assert!(fresh.line().starts_with("step 1 loss - "), "{}", fresh.line());
        assert!(fresh.systemd_line().contains("loss -"), "{}", fresh.systemd_line());
        assert!(!fresh.prometheus().contains("dinostream_loss"));
    }

    #[test]
    fn a_degraded_service_says_so_in_every_report() {
        let s = Status {
            checkpoint_failures: 2,
            checkpoint_error: Some("No space left on device".into()),
            unsaved_steps: 40,
            training_paused: true,
            ..sample()
        };
        for line in [s.line(), s.systemd_line()] {
            assert!(
                line.contains("DEGRADED") && line.contains("No space left") && line.contains("paused"),
                "{line}"
            );
        }
        let text = s.prometheus();
        assert!(
            text.contains("dinostream_checkpoint_failures 2\n")
                && text.contains("dinostream_training_paused 1\n"),
            "{text}"
        );
        assert!(!sample().line().contains("DEGRADED"));
    }

    #[test]
    fn prometheus_text_has_gauges_and_skips_unset_indicators() {
        let text = sample().prometheus();
        assert!(text.contains("dinostream_step 42\n"), "{text}");
        assert!(text.contains("dinostream_kl_teacher_student 0.25\n"));
        assert!(
            text.contains("dinostream_fresh_steps 5\n") && text.contains("dinostream_replay_only_steps 37\n")
        );
        assert!(text.contains("dinostream_busy_fraction 0.5\n"), "{text}");
        assert!(!text.contains("teacher_entropy_ratio"));
    }

    #[test]
    fn metrics_endpoint_answers_on_localhost() {
        let port = serve_metrics(0, Arc::new(Mutex::new(sample()))).unwrap();
        let mut conn = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.contains("dinostream_loss 7.5"));
    }
}
