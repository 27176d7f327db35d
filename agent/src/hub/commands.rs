//! Commands from the hub: `{prefix}/{device}/commands/{name}` carrying `{"id": ..., "args": ...}`,
//! answered on `{prefix}/{device}/responses/{id}` with `{"id", "ok": true, "result"}` or
//! `{"id", "ok": false, "error"}`.
//!
//! Payloads are untrusted: size-limited before parsing; the id must be a safe topic level
//! (it becomes part of the reply topic), and a command without a usable id gets no reply
//! because there is nowhere to send one. Commands run one at a time, each with a time limit.
//!
//! On a device that trusts signing keys the broker is not trusted either (Uptane's threat
//! model): a command must be a DSSE envelope of [`signing::COMMAND_TYPE`] signed by a trusted
//! key, naming this device, the command, a request id and an expiry at most
//! [`MAX_COMMAND_LIFETIME`] ahead; each request id is taken once while it is valid (replays
//! are refused). Unsigned commands get an error reply saying why.

use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use outpost_core::wire::command::{CommandRequest, SignedCommand};

use super::report::merged;
use super::topics::{Topics, is_level};
use super::unix_now;
use crate::control::AgentHandle;
use crate::signing::{self, Envelope, TrustedKeys};
use crate::state::DeploymentReport;

/// Commands waiting to run; more are dropped (with a warning) rather than queued.
pub const QUEUE: usize = 16;
/// Largest command payload read.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;
/// Most log bytes a `logs` reply carries.
pub const MAX_LOG_BYTES: usize = 64 * 1024;
/// Most log lines a `logs` command may ask for.
pub const MAX_TAIL: usize = 10_000;
pub const DEFAULT_TAIL: usize = 100;
/// How long one command may take before it is answered with an error.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The commands this agent knows, for the error reply to any other.
pub const KNOWN: &[&str] = &["restart-module", "logs", "ping", "state", SUPPORT_BUNDLE];
/// The command whose answer is a file, sent in chunks (`outpost_core::wire::bundle`).
pub const SUPPORT_BUNDLE: &str = "support-bundle";
/// The furthest ahead a signed command may expire: what the replay memory must cover.
pub const MAX_COMMAND_LIFETIME: Duration = Duration::from_secs(3600);
/// Request ids remembered against replay; beyond it, new signed commands wait for old ones
/// to expire.
pub const MAX_REMEMBERED: usize = 4096;

/// A command as it arrived.
#[derive(Debug)]
pub struct Command {
    pub name: String,
    pub payload: Vec<u8>,
}

pub struct Context {
    pub client: AsyncClient,
    pub topics: Topics,
    pub handle: AgentHandle,
    pub rejected: watch::Receiver<Option<DeploymentReport>>,
    /// With keys, only signed commands are carried out.
    pub trusted: TrustedKeys,
    /// The agent's configuration, for `support-bundle` (its checks and its redacted copy).
    pub config: std::sync::Arc<crate::config::Config>,
}

/// Request ids of signed commands taken, with when each expires (Unix ms).
#[derive(Debug, Default)]
pub struct Seen(std::collections::BTreeMap<String, u64>);

impl Seen {
    /// Takes `id` unless it was taken before; forgets expired ids first.
    fn take(&mut self, id: &str, expires_ms: u64, now_ms: u64) -> Result<(), String> {
        self.0
            .retain(|_, exp| *exp + crate::binding::EXPIRY_TOLERANCE_MS >= now_ms);
        if self.0.contains_key(id) {
            return Err(format!(
                "request id `{id}` was already used: a replay is refused"
            ));
        }
        if self.0.len() >= MAX_REMEMBERED {
            return Err("too many signed commands in the last hour; try again later".into());
        }
        self.0.insert(id.to_string(), expires_ms);
        Ok(())
    }
}

/// Runs until `stop` is cancelled or the event loop goes away.
pub async fn run(ctx: Context, mut rx: mpsc::Receiver<Command>, stop: CancellationToken) {
    let mut seen = Seen::default();
    loop {
        let command = tokio::select! {
            _ = stop.cancelled() => return,
            c = rx.recv() => match c { Some(c) => c, None => return },
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = handle_one(&ctx, &mut seen, command) => {}
        }
    }
}

async fn handle_one(ctx: &Context, seen: &mut Seen, command: Command) {
    let (request, authorised) = screen(
        &command.name,
        &command.payload,
        &ctx.topics.device,
        &ctx.trusted,
        seen,
    );
    let request = match request {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(command = %command.name, %why, "command ignored: no usable id to reply to");
            return;
        }
    };
    tracing::info!(command = %command.name, id = %request.id, "command");
    let outcome = match authorised {
        Err(why) => {
            tracing::warn!(command = %command.name, id = %request.id, %why, "command refused");
            Err(why)
        }
        Ok(()) if command.name == SUPPORT_BUNDLE => {
            // Its answer is several replies, sent as they are cut; only a failure is left
            // for the single reply below.
            match tokio::time::timeout(COMMAND_TIMEOUT, support_bundle(ctx, &request.id)).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("timed out after {COMMAND_TIMEOUT:?}")),
            }
        }
        Ok(()) => {
            match tokio::time::timeout(COMMAND_TIMEOUT, execute(ctx, &command.name, &request.args))
                .await
            {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("timed out after {COMMAND_TIMEOUT:?}")),
            }
        }
    };
    let reply = match outcome {
        Ok(result) => json!({"id": request.id, "ok": true, "result": result}),
        Err(error) => {
            tracing::info!(command = %command.name, id = %request.id, %error, "command failed");
            json!({"id": request.id, "ok": false, "error": error})
        }
    };
    // A `Value` always serializes.
    let bytes = serde_json::to_vec(&reply).unwrap_or_default();
    if let Err(e) = ctx
        .client
        .publish(
            ctx.topics.response(&request.id),
            QoS::AtLeastOnce,
            false,
            bytes,
        )
        .await
    {
        tracing::warn!(error = %e, "command reply not sent");
    }
}

/// What the device makes of a command's untrusted bytes: the request (to reply to, when it
/// has a usable id) and whether it may run. Without trusted keys any well-formed command runs;
/// with them only a signed one for this device, this command name, not expired, not replayed.
pub fn screen(
    name: &str,
    payload: &[u8],
    device: &str,
    trusted: &TrustedKeys,
    seen: &mut Seen,
) -> (Result<CommandRequest, String>, Result<(), String>) {
    if trusted.is_empty() || payload.len() > MAX_COMMAND_BYTES {
        return (parse(payload), Ok(()));
    }
    let Ok(envelope) = serde_json::from_slice::<Envelope>(payload) else {
        // Unsigned: answer (if it has an id) that it is refused, and why.
        return (
            parse(payload),
            Err("unsigned command refused: this device trusts signing keys, so commands must be signed (`outpost-ctl cmd --sign-key KEY`)".into()),
        );
    };
    // The id to reply to comes from the payload even when the signature is bad, so the
    // operator hears why; nothing runs unless every check passes.
    let opened = signing::open_as(signing::COMMAND_TYPE, &envelope)
        .ok()
        .and_then(|body| serde_json::from_slice::<SignedCommand>(&body).ok());
    let Some(claimed) = opened else {
        return (
            Err("not a signed command envelope".into()),
            Err("not a signed command".into()),
        );
    };
    let request = if is_level(&claimed.id) {
        Ok(CommandRequest {
            id: claimed.id.clone(),
            args: claimed.args.clone(),
        })
    } else {
        Err("`id` must be 1 to 128 letters, digits, `.`, `_` or `-`".to_string())
    };
    let verdict = (|| {
        let (body, _) = trusted
            .verify_as(signing::COMMAND_TYPE, &envelope)
            .map_err(|e| format!("signature refused: {e}"))?;
        let signed: SignedCommand =
            serde_json::from_slice(&body).map_err(|e| format!("not a signed command: {e}"))?;
        if signed.device != device {
            return Err(format!(
                "signed for device `{}`; this device is `{device}`",
                signed.device
            ));
        }
        if signed.command != name {
            return Err(format!(
                "signed for command `{}`, but it arrived as `{name}`",
                signed.command
            ));
        }
        let now_ms = crate::binding::trusted_now(unix_now().saturating_mul(1000), 0);
        let rules = crate::binding::Rules {
            device,
            require: true,
            now_ms,
        };
        if let Some(issue) = crate::binding::expiry_issue(Some(&signed.expires_at), &rules) {
            return Err(issue.message);
        }
        let expires_ms = crate::clock::parse_rfc3339(&signed.expires_at)
            .unwrap_or(0)
            .saturating_mul(1000);
        if expires_ms > now_ms + MAX_COMMAND_LIFETIME.as_millis() as u64 {
            return Err(format!(
                "expires more than {} s ahead: sign commands for a short time (`--expires-in 5m`)",
                MAX_COMMAND_LIFETIME.as_secs()
            ));
        }
        seen.take(&signed.id, expires_ms, now_ms)
    })();
    (request, verdict)
}

fn parse(payload: &[u8]) -> Result<CommandRequest, String> {
    if payload.len() > MAX_COMMAND_BYTES {
        return Err(format!(
            "{} bytes, over the {MAX_COMMAND_BYTES}-byte limit",
            payload.len()
        ));
    }
    let request: CommandRequest =
        serde_json::from_slice(payload).map_err(|e| format!("not a command: {e}"))?;
    if !is_level(&request.id) {
        return Err("`id` must be 1 to 128 letters, digits, `.`, `_` or `-`".into());
    }
    Ok(request)
}

async fn execute(ctx: &Context, name: &str, args: &Value) -> Result<Value, String> {
    match name {
        "ping" => Ok(json!({
            "pong": true,
            "deviceId": ctx.topics.device,
            "agentVersion": outpost_core::version::current(),
            "time": unix_now(),
        })),
        "state" => {
            let state = merged(&ctx.handle.state.borrow(), ctx.rejected.borrow().as_ref());
            serde_json::to_value(state).map_err(|e| e.to_string())
        }
        "restart-module" => {
            let module = module_arg(args)?;
            ctx.handle
                .restart_module(&module)
                .await
                .map_err(|e| e.to_string())??;
            Ok(json!({"restarted": module}))
        }
        "logs" => {
            let module = module_arg(args)?;
            let tail = match args.get("tail") {
                None | Some(Value::Null) => DEFAULT_TAIL,
                Some(v) => v
                    .as_u64()
                    .filter(|n| (1..=MAX_TAIL as u64).contains(n))
                    .ok_or(format!("`args.tail` must be a number from 1 to {MAX_TAIL}"))?
                    as usize,
            };
            let text = ctx
                .handle
                .logs(&module, tail, MAX_LOG_BYTES)
                .await
                .map_err(|e| e.to_string())??;
            let (text, truncated) = cap_tail(&text, MAX_LOG_BYTES);
            Ok(json!({"module": module, "tail": tail, "truncated": truncated, "text": text}))
        }
        other => Err(format!(
            "unknown command `{other}`; this agent knows {}",
            KNOWN.join(", ")
        )),
    }
}

/// Makes the support bundle and publishes it in numbered chunks on the request's responses
/// topic, each `{"id", "ok": true, "result": Chunk}`; the operator checks the digest of the
/// whole (`outpost_core::wire::bundle`).
async fn support_bundle(ctx: &Context, id: &str) -> Result<(), String> {
    let bundle = crate::support::from_agent(&ctx.config, &ctx.handle).await;
    let chunks = outpost_core::wire::bundle::split(&bundle.bytes).map_err(|e| e.to_string())?;
    tracing::info!(
        bytes = bundle.bytes.len(),
        chunks = chunks.len(),
        "support bundle made; sending"
    );
    for chunk in chunks {
        let reply = json!({"id": id, "ok": true, "result": chunk});
        let bytes = serde_json::to_vec(&reply).map_err(|e| e.to_string())?;
        ctx.client
            .publish(ctx.topics.response(id), QoS::AtLeastOnce, false, bytes)
            .await
            .map_err(|e| format!("chunk not sent: {e}"))?;
    }
    Ok(())
}

fn module_arg(args: &Value) -> Result<String, String> {
    args.get("module")
        .and_then(Value::as_str)
        .filter(|m| is_level(m))
        .map(str::to_string)
        .ok_or_else(|| "`args.module` must name a module".to_string())
}

/// The last `max` bytes of `text` (cut at a character boundary), and whether it was cut:
/// the end of a log is what an operator wants.
fn cap_tail(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    (&text[start..], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_need_a_safe_id() {
        assert!(parse(br#"{"id":"r-1","args":{"module":"a"}}"#).is_ok());
        assert!(parse(br#"{"id":"r-1"}"#).is_ok());
        assert!(parse(br#"{"id":"a/b"}"#).is_err());
        assert!(parse(br#"{"id":""}"#).is_err());
        assert!(parse(b"\xff").is_err());
        assert!(parse(&vec![b' '; MAX_COMMAND_BYTES + 1]).is_err());
    }

    proptest::proptest! {
        /// Untrusted payloads never panic the parser, and an accepted id is a safe topic level.
        #[test]
        fn any_payload_is_parsed_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            if let Ok(request) = parse(&bytes) {
                proptest::prop_assert!(is_level(&request.id));
            }
        }

        #[test]
        fn cap_tail_cuts_on_char_boundaries(text in ".{0,64}", max in 0usize..80) {
            let (tail, cut) = cap_tail(&text, max);
            proptest::prop_assert!(tail.len() <= max || !cut);
            proptest::prop_assert!(text.ends_with(tail));
        }
    }

    #[test]
    fn logs_keep_their_end() {
        assert_eq!(cap_tail("abc", 5), ("abc", false));
        assert_eq!(cap_tail("abcdef", 3), ("def", true));
        // "é" is two bytes: the cut moves forward to a boundary.
        assert_eq!(cap_tail("aéb", 2), ("b", true));
    }
}
