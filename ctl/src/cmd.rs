//! `cmd`: one command to one device (signed when a key is given), and its answer; a file
//! answer (`support-bundle`) is put together from its chunks and checked against its digest.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use outpost_core::signing;
use outpost_core::wire::bundle::{Assembly, Chunk};
use outpost_core::wire::topics::{self, is_level};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::deploy::wall_ms;
use crate::hub::Operator;
use crate::{EXIT_REFUSED, EXIT_TIMEOUT};

/// The device command whose answer is a file in chunks (the agent's `support-bundle`).
pub const SUPPORT_BUNDLE: &str = "support-bundle";

/// How the answer is taken: printed (as JSON with `json`), or for a file answer written to
/// `out`.
pub(crate) struct Answer<'a> {
    pub timeout: Duration,
    pub out: Option<&'a Path>,
    pub json: bool,
}

pub(crate) async fn cmd(
    mut op: Operator,
    device: &str,
    name: &str,
    args: Option<&str>,
    sign: Option<(&Path, Duration)>,
    answer: Answer<'_>,
) -> Result<u8> {
    let Answer {
        timeout,
        out,
        json: json_out,
    } = answer;
    if !is_level(device) || !is_level(name) {
        bail!("device and command names are 1 to 128 letters, digits, `.`, `_` or `-`");
    }
    let file_answer = name == SUPPORT_BUNDLE;
    if file_answer && out.is_none() {
        bail!("`{name}` answers with a file: give --out FILE");
    }
    let args: Value = match args {
        Some(text) => serde_json::from_str(text).context("--args is not JSON")?,
        None => Value::Null,
    };
    let prefix = op.prefix().to_string();
    let id = crate::hub::request_id();
    let reply_topic = topics::device_topic(&prefix, device, &format!("responses/{id}"));
    op.subscribe(std::slice::from_ref(&reply_topic)).await?;
    op.fence(Duration::from_secs(10)).await?;
    let body = match sign {
        None => serde_json::to_vec(&json!({"id": id, "args": args}))?,
        Some((key, expires_in)) => {
            let signed = outpost_core::wire::command::SignedCommand {
                command: name.to_string(),
                device: device.to_string(),
                id: id.clone(),
                expires_at: outpost_core::binding::expiry_after(wall_ms(), expires_in),
                args,
            };
            let key = signing::load_signing_key(key)?;
            let envelope =
                signing::sign_as(signing::COMMAND_TYPE, &serde_json::to_vec(&signed)?, &key);
            serde_json::to_vec(&envelope)?
        }
    };
    op.publish(
        &topics::device_topic(&prefix, device, &format!("commands/{name}")),
        false,
        body,
    )
    .await?;
    let deadline = Instant::now() + timeout;
    let mut assembly = Assembly::default();
    loop {
        let Some(m) = op.recv_until(deadline).await? else {
            let (got, of) = assembly.progress();
            if got > 0 {
                eprintln!(
                    "{device} sent {got} of {of} chunks within {timeout:?}; try a longer --timeout"
                );
            } else {
                eprintln!("no answer from {device} within {timeout:?} (is it online?)");
            }
            return Ok(EXIT_TIMEOUT);
        };
        if m.topic != reply_topic {
            continue;
        }
        let reply: Value =
            serde_json::from_slice(&m.payload).context("the device's reply is not JSON")?;
        let ok = reply.get("ok").and_then(Value::as_bool).unwrap_or(false);
        if let (true, true, Some(out)) = (file_answer, ok, out) {
            let chunk: Chunk =
                serde_json::from_value(reply.get("result").cloned().unwrap_or_default())
                    .context("the device's reply is not a chunk of a file")?;
            let Some(file) = assembly
                .add(chunk)
                .context("the file from the device is damaged")?
            else {
                continue;
            };
            std::fs::write(out, &file)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let digest = outpost_core::intake::hex_sha256(&file);
            if json_out {
                println!(
                    "{}",
                    json!({"file": out.display().to_string(), "bytes": file.len(), "sha256": digest})
                );
            } else {
                println!(
                    "wrote {} ({} bytes, sha256 {digest})",
                    out.display(),
                    file.len()
                );
            }
            return Ok(0);
        }
        if json_out {
            println!("{reply}");
        } else if ok {
            match reply.get("result") {
                Some(Value::Object(o)) if o.get("text").is_some_and(Value::is_string) => {
                    print!(
                        "{}",
                        o.get("text").and_then(Value::as_str).unwrap_or_default()
                    )
                }
                Some(result) => println!("{}", serde_json::to_string_pretty(result)?),
                None => println!("ok"),
            }
        } else {
            eprintln!(
                "{device} refused `{name}`: {}",
                reply
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given")
            );
        }
        return Ok(if ok { 0 } else { EXIT_REFUSED });
    }
}
