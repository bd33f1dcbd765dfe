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
    /// Loss of the last step.
    pub loss: f64,
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
    /// Unix time of this report, seconds.
    pub updated_unix_secs: u64,
}

impl Status {
    /// Write `status.json` into `dir` atomically.
    pub fn write_json(&self, dir: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("Status serialises to JSON");
        crate::fsio::write_atomic(&dir.join("status.json"), &json)
    }

    /// Prometheus text exposition format (every numeric field as a gauge; unset indicators omitted).
    pub fn prometheus(&self) -> String {
        let value = serde_json::to_value(self).expect("Status serialises to JSON");
        let mut out = String::new();
        for (key, v) in value.as_object().expect("Status is a JSON object") {
            if let Some(x) = v.as_f64() {
                out.push_str(&format!("# TYPE dinostream_{key} gauge\ndinostream_{key} {x}\n"));
            }
        }
        out
    }
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
            loss: 7.5,
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
