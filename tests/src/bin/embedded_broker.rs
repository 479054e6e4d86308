//! A real MQTT 3.1.1 broker (rumqttd) for machines without mosquitto, so `cargo test` passes
//! with Rust alone. `embedded-broker PORT V5PORT` listens on 127.0.0.1:PORT (MQTT 3.1.1) and
//! 127.0.0.1:V5PORT (MQTT 5) until killed; `embedded-broker PORT V5PORT AUTHPORT USER PASSWORD`
//! also listens on 127.0.0.1:AUTHPORT (MQTT 3.1.1) for USER with PASSWORD only.

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: embedded-broker PORT V5PORT");
    let v5_port: u16 = std::env::args()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .expect("usage: embedded-broker PORT V5PORT");
    let args: Vec<String> = std::env::args().collect();
    let auth_listener = match &args[..] {
        [_, _, _, port, user, password] => format!(
            r#"
[v4.2]
name = "v4-auth"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.2.connections]
connection_timeout_ms = 60000
max_payload_size = 4194304
max_inflight_count = 200
dynamic_filters = true
auth = {{ "{user}" = "{password}" }}
"#
        ),
        _ => String::new(),
    };
    let config = format!(
        r#"
id = 0
[router]
max_connections = 1000
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 4194304
max_inflight_count = 200
dynamic_filters = true

[v5.1]
name = "v5-1"
listen = "127.0.0.1:{v5_port}"
next_connection_delay_ms = 1
[v5.1.connections]
connection_timeout_ms = 60000
max_payload_size = 4194304
max_inflight_count = 200
dynamic_filters = true
{auth_listener}"#
    );
    let config: rumqttd::Config = toml::from_str(&config).expect("embedded broker config");
    eprintln!("embedded broker starting on 127.0.0.1:{port}");
    rumqttd::Broker::new(config)
        .start()
        .expect("embedded broker stopped");
}
