//! One module's connection from its CONNECT to its end: the login (module name and password,
//! membership of the deployment in force, connections per module), registering the client
//! (a newer connection with the same client id takes over), the session, and unregistering.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{ConnAck, ConnectReturnCode, Packet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Stream;
use super::clients::{Client, ClientKey, Pending, Shared};
use super::codec::{read_packet, write};
use super::session::Conn;
use super::{
    CONNECT_TIMEOUT, IDLE_WITHOUT_KEEP_ALIVE, MAX_CONNECT, MAX_PER_MODULE, SUBSCRIBER_QUEUE,
};

pub(super) async fn connection<S: Stream>(
    mut stream: S,
    shared: &Arc<Shared>,
    pending: Pending,
    stop: CancellationToken,
) -> Result<(), String> {
    let mut input = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(
        CONNECT_TIMEOUT,
        read_packet(&mut stream, &mut input, MAX_CONNECT),
    )
    .await
    .map_err(|_| "no CONNECT in time".to_string())??;
    let Packet::Connect(connect) = first else {
        return Err("first packet is not CONNECT".into());
    };
    let mut output = BytesMut::with_capacity(4096);
    let refuse = |code| Packet::ConnAck(ConnAck::new(code, false));
    if connect.protocol != rumqttc::Protocol::V4 {
        write(
            &mut stream,
            &mut output,
            refuse(ConnectReturnCode::RefusedProtocolVersion),
        )
        .await?;
        return Err("MQTT 5 is not spoken here; use 3.1.1".into());
    }
    let (module, authorized) = match &connect.login {
        Some(login) => (
            login.username.clone(),
            crate::manifest::validate::is_module_name(&login.username)
                && shared.secret.verify(&login.username, &login.password),
        ),
        None => (String::new(), false),
    };
    if !authorized {
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(user = %module, "bus connection refused: bad module name or password");
        write(
            &mut stream,
            &mut output,
            refuse(ConnectReturnCode::BadUserNamePassword),
        )
        .await?;
        return Err("bad credentials".into());
    }
    // Only the modules of the deployment in force: a module removed from it (or never in it)
    // still has a password that verifies, derived from its name.
    if !shared.routes.borrow().allows(&module) {
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            module,
            "bus connection refused: the module is not in the deployment in force"
        );
        write(
            &mut stream,
            &mut output,
            refuse(ConnectReturnCode::NotAuthorized),
        )
        .await?;
        return Err("not in the deployment".into());
    }
    let held = shared
        .clients()
        .values()
        .filter(|c| c.module == module)
        .count();
    if held >= MAX_PER_MODULE {
        shared.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            module,
            max = MAX_PER_MODULE,
            "bus connection refused: the module holds too many connections"
        );
        write(
            &mut stream,
            &mut output,
            refuse(ConnectReturnCode::ServiceUnavailable),
        )
        .await?;
        return Err("too many connections of this module".into());
    }
    drop(pending);
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let client_id = if connect.client_id.is_empty() {
        format!("{module}-{conn_id}")
    } else {
        connect.client_id.clone()
    };
    // Acknowledge before registering: a failed write leaves nothing behind.
    write(
        &mut stream,
        &mut output,
        Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
    )
    .await?;
    let (tx, mut rx) = mpsc::channel(SUBSCRIBER_QUEUE);
    let kick = stop.child_token();
    let queued = Arc::new(AtomicUsize::new(0));
    let key: ClientKey = (module.clone(), client_id.clone());
    if let Some(old) = shared.clients().insert(
        key.clone(),
        Client {
            conn: conn_id,
            module: module.clone(),
            filters: Vec::new(),
            tx,
            queued: queued.clone(),
            kick: kick.clone(),
        },
    ) {
        // MQTT: a new connection with the same client id (of the same module) takes over.
        old.kick.cancel();
    }
    shared.counters.clients.fetch_add(1, Ordering::Relaxed);
    tracing::info!(module, client_id, "module connected to the bus");
    let mut conn = Conn {
        shared,
        module,
        key,
        conn_id,
        queued,
        stream,
        input,
        output,
        acks: VecDeque::new(),
        next_pkid: 0,
    };
    // Keep-alive: 1.5 times what the client asked for; a client that asks for none is closed
    // after a long silence instead of holding its connection forever.
    let keep_alive = Some(if connect.keep_alive > 0 {
        Duration::from_millis(u64::from(connect.keep_alive) * 1500)
    } else {
        IDLE_WITHOUT_KEEP_ALIVE
    });
    let result = conn.run(&mut rx, keep_alive, kick, &stop).await;
    {
        let mut clients = shared.clients();
        if clients.get(&conn.key).is_some_and(|c| c.conn == conn_id) {
            clients.remove(&conn.key);
        }
    }
    shared.counters.clients.fetch_sub(1, Ordering::Relaxed);
    tracing::info!(module = %conn.module, reason = result.as_ref().err().map(String::as_str).unwrap_or("disconnected"), "module left the bus");
    result
}
