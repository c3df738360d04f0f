//! Progress of long runs, wherever stderr goes: bars on a terminal (indicatif), plain timestamped lines
//! elsewhere (CI logs, `2> log`), at most one every `QGATE_PROGRESS_INTERVAL` seconds (default 5) plus one
//! when the stage ends, and nothing at all under `--quiet`.
use std::borrow::Cow;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress output of any kind for the rest of the process.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether commands should report progress at all (false under `--quiet`). How it is shown (bars or
/// lines) is decided when a [`Progress`] is created, from whether stderr is a terminal.
pub fn enabled() -> bool {
    !QUIET.load(Ordering::Relaxed)
}

/// Seconds between two progress lines when stderr is not a terminal.
pub const DEFAULT_INTERVAL_S: f64 = 5.0;

fn interval() -> Duration {
    std::env::var("QGATE_PROGRESS_INTERVAL")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs_f64(DEFAULT_INTERVAL_S))
}

/// One stage's progress (`total` steps of `unit`). Cheap to clone; every method takes `&self`.
#[derive(Clone)]
pub struct Progress(Inner);

#[derive(Clone)]
enum Inner {
    Hidden,
    Bar(indicatif::ProgressBar),
    Lines(Arc<Mutex<Lines>>),
}

struct Lines {
    what: String,
    unit: &'static str,
    total: u64,
    pos: u64,
    msg: String,
    start: Instant,
    last: Instant,
    every: Duration,
    done: bool,
}

impl Progress {
    /// A bar on a terminal, timestamped lines otherwise, nothing when `enabled` is false or under `--quiet`.
    pub fn new(enabled: bool, total: u64, what: &str, unit: &'static str) -> Progress {
        if !enabled || !self::enabled() {
            return Progress(Inner::Hidden);
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&format!(
                    "{{spinner}} {{prefix}} {{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{elapsed}} elapsed, ETA {{eta}}"
                ))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(what.to_string());
            return Progress(Inner::Bar(bar));
        }
        let now = Instant::now();
        Progress(Inner::Lines(Arc::new(Mutex::new(Lines {
            what: what.to_string(),
            unit,
            total,
            pos: 0,
            msg: String::new(),
            start: now,
            last: now,
            every: interval(),
            done: false,
        }))))
    }

    pub fn inc(&self, n: u64) {
        match &self.0 {
            Inner::Hidden => {}
            Inner::Bar(b) => b.inc(n),
            Inner::Lines(l) => {
                if let Ok(mut l) = l.lock() {
                    l.pos = l.pos.saturating_add(n);
                    let now = Instant::now();
                    if now.duration_since(l.last) >= l.every {
                        l.last = now;
                        emit(&l.line(now));
                    }
                }
            }
        }
    }

    /// What the stage is doing now (`layer 3/64`): shown in the bar, and in the next progress line.
    pub fn set_message(&self, msg: impl Into<Cow<'static, str>>) {
        match &self.0 {
            Inner::Hidden => {}
            Inner::Bar(b) => b.set_message(msg),
            Inner::Lines(l) => {
                if let Ok(mut l) = l.lock() {
                    l.msg = msg.into().into_owned();
                }
            }
        }
    }

    /// The stage is over: clear the bar, or write the closing line (steps done and time taken).
    pub fn finish_and_clear(&self) {
        match &self.0 {
            Inner::Hidden => {}
            Inner::Bar(b) => b.finish_and_clear(),
            Inner::Lines(l) => {
                if let Ok(mut l) = l.lock() {
                    if !l.done {
                        l.done = true;
                        let el = Instant::now().duration_since(l.start);
                        let line = format!(
                            "{} qgate: {}: done, {}/{} {} in {}",
                            utc_now(),
                            l.what,
                            l.pos,
                            l.total,
                            l.unit,
                            hms(el)
                        );
                        emit(&line);
                    }
                }
            }
        }
    }
}

impl Lines {
    fn line(&self, now: Instant) -> String {
        let el = now.duration_since(self.start);
        let pct = if self.total > 0 {
            format!(" ({:.0}%)", 100.0 * self.pos as f64 / self.total as f64)
        } else {
            String::new()
        };
        let eta = if self.pos > 0 && self.total >= self.pos {
            let left = el.mul_f64((self.total - self.pos) as f64 / self.pos as f64);
            hms(left)
        } else {
            "unknown".into()
        };
        let msg = if self.msg.is_empty() {
            String::new()
        } else {
            format!(" {}", self.msg)
        };
        format!(
            "{} qgate: {}{msg}: {}/{} {}{pct}, elapsed {}, ETA {eta}",
            utc_now(),
            self.what,
            self.pos,
            self.total,
            self.unit,
            hms(el)
        )
    }
}

fn emit(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
}

/// `1h02m03s`, `4m05s`, `7s`.
pub fn hms(d: Duration) -> String {
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, (s / 60) % 60, s % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc(secs)
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian calendar).
pub fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days to civil date (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 12:34:56 (a leap day in a century leap year)
        assert_eq!(utc(951_827_696), "2000-02-29T12:34:56Z");
        // 2026-12-31 23:59:59
        assert_eq!(utc(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn durations() {
        assert_eq!(hms(Duration::from_secs(7)), "7s");
        assert_eq!(hms(Duration::from_secs(245)), "4m05s");
        assert_eq!(hms(Duration::from_secs(3723)), "1h02m03s");
    }

    #[test]
    fn line_has_position_and_eta() {
        let start = Instant::now();
        let l = Lines {
            what: "oracle (streamed)".into(),
            unit: "layers+head chunks",
            total: 10,
            pos: 5,
            msg: "layer 5/8".into(),
            start,
            last: start,
            every: Duration::ZERO,
            done: false,
        };
        let text = l.line(start + Duration::from_secs(20));
        assert!(
            text.ends_with(
                "qgate: oracle (streamed) layer 5/8: 5/10 layers+head chunks (50%), elapsed 20s, ETA 20s"
            ),
            "{text}"
        );
    }
}
