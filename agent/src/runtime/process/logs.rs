//! A process module's output: written by its shim as lines `TIME STREAM TEXT` (RFC 3339 with
//! milliseconds, `stdout` or `stderr`) into `log`, rotated by size into `log.1`, `log.2`…, and
//! read back for `outpost logs` and the hub's logs command with the options Docker's take.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use super::files::LOG;

/// Appends lines, rotating when the current file would pass `max_bytes`.
pub struct LogWriter {
    dir: PathBuf,
    max_bytes: u64,
    max_files: u32,
    file: File,
    size: u64,
}

impl LogWriter {
    pub fn open(dir: &Path, max_bytes: u64, max_files: u32) -> io::Result<LogWriter> {
        let path = dir.join(LOG);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            max_bytes: max_bytes.max(4096),
            max_files: max_files.max(1),
            file,
            size,
        })
    }

    /// One line of output (without its newline; invalid UTF-8 is replaced).
    pub fn line(&mut self, stream: &str, text: &[u8]) -> io::Result<()> {
        let line = format!(
            "{} {stream} {}\n",
            now_rfc3339_ms(),
            String::from_utf8_lossy(text).trim_end_matches(['\n', '\r'])
        );
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.size += line.len() as u64;
        Ok(())
    }

    /// `log` becomes `log.1`, `log.1` becomes `log.2`…; the oldest beyond `max_files` goes.
    fn rotate(&mut self) -> io::Result<()> {
        let name = |i: u32| {
            if i == 0 {
                self.dir.join(LOG)
            } else {
                self.dir.join(format!("{LOG}.{i}"))
            }
        };
        for i in (0..self.max_files - 1).rev() {
            let from = name(i);
            if from.exists() {
                std::fs::rename(&from, name(i + 1))?;
            }
        }
        if self.max_files == 1 {
            std::fs::remove_file(name(0)).ok();
        }
        self.file = OpenOptions::new().create(true).append(true).open(name(0))?;
        self.size = 0;
        Ok(())
    }
}

fn now_rfc3339_ms() -> String {
    let ms = outpost_core::time::wall_now_ms();
    let base = outpost_core::time::format_rfc3339(ms / 1000);
    // `…:SSZ` → `…:SS.mmmZ`
    format!("{}.{:03}Z", base.trim_end_matches('Z'), ms % 1000)
}

/// One line read back: its time (Unix seconds) and the text without time and stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub at: u64,
    pub stamp: String,
    pub text: String,
}

fn parse(line: &str) -> Option<Line> {
    let mut parts = line.splitn(3, ' ');
    let stamp = parts.next()?;
    let _stream = parts.next()?;
    let text = parts.next().unwrap_or("");
    Some(Line {
        at: outpost_core::time::parse_rfc3339(stamp)?,
        stamp: stamp.to_string(),
        text: text.to_string(),
    })
}

/// Every line kept, oldest first (the rotated files, then the current one).
pub fn read_all(dir: &Path, max_files: u32) -> Vec<Line> {
    let mut lines = Vec::new();
    for i in (0..max_files.max(1)).rev() {
        let path = if i == 0 {
            dir.join(LOG)
        } else {
            dir.join(format!("{LOG}.{i}"))
        };
        let Ok(file) = File::open(&path) else {
            continue;
        };
        lines.extend(
            io::BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| parse(&l)),
        );
    }
    lines
}

/// The length of the current file: where a follower goes on from.
pub fn current_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG)).map_or(0, |m| m.len())
}

/// Lines of the current file from byte `from` on (a follower's next lines); a file shorter
/// than `from` was rotated: everything in it is new.
pub fn read_from(dir: &Path, from: u64) -> (Vec<Line>, u64) {
    use std::io::{Read as _, Seek as _};
    let Ok(mut file) = File::open(dir.join(LOG)) else {
        return (Vec::new(), 0);
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = if len < from { 0 } else { from };
    if file.seek(io::SeekFrom::Start(start)).is_err() {
        return (Vec::new(), from);
    }
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    // Only whole lines: a line being written waits for the next read.
    let complete = text.rfind('\n').map_or(0, |i| i + 1);
    let lines = text[..complete].lines().filter_map(parse).collect();
    (lines, start + complete as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_rotate_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 4096, 3).unwrap();
        for i in 0..400 {
            w.line(
                "stdout",
                format!("line {i:04} {}", "x".repeat(20)).as_bytes(),
            )
            .unwrap();
        }
        let lines = read_all(dir.path(), 3);
        assert!(dir.path().join("log.2").exists() && !dir.path().join("log.3").exists());
        assert!(lines.len() < 400, "the oldest were rotated away");
        assert!(lines.last().unwrap().text.starts_with("line 0399"));
        let numbers: Vec<&str> = lines.iter().map(|l| &l.text[5..9]).collect();
        let mut sorted = numbers.clone();
        sorted.sort();
        assert_eq!(numbers, sorted, "oldest first");
        let total: u64 = ["log", "log.1", "log.2"]
            .iter()
            .map(|f| std::fs::metadata(dir.path().join(f)).unwrap().len())
            .sum();
        assert!(total <= 3 * 4096, "capped: {total}");
    }

    #[test]
    fn a_follower_reads_only_whole_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = LogWriter::open(dir.path(), 1 << 20, 2).unwrap();
        w.line("stdout", b"one").unwrap();
        let (lines, at) = read_from(dir.path(), 0);
        assert_eq!(lines.len(), 1);
        w.line("stderr", b"two\n").unwrap();
        let (lines, _) = read_from(dir.path(), at);
        assert_eq!(
            lines.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
            ["two"]
        );
    }
}
