//! The LAN beacon listener: every datagram that reaches the beacon port goes to
//! [`crate::runtime::Node::hear_beacon`], which judges it; nothing is ever sent back.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::warn;

use crate::adapters::beacon::BeaconSocket;
use crate::runtime::Node;

/// Hears beacons until `stop` turns true.
pub async fn serve(socket: Arc<BeaconSocket>, node: Arc<Node>, mut stop: watch::Receiver<bool>) {
    let mut errors = super::Throttle::new(std::time::Duration::from_secs(60), 3);
    loop {
        tokio::select! {
            r = socket.recv() => match r {
                Ok((datagram, from)) => node.hear_beacon(from, &datagram),
                Err(e) => {
                    if let Some(held) = errors.due() {
                        warn!(held_back = held, "cannot read a LAN beacon: {e}");
                    }
                    // Backoff: an error that repeats at once (the socket is gone) must not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
    }
}
