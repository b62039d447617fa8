// Package agent is gwagent's lifecycle: it loads and reloads the config,
// opens the key stores, waits for a sane clock, provisions through DPS,
// connects to the hub and serves each session, reconnects, and wires its
// parts together: the status (agent/status), health messages
// (agent/health), the twin and direct methods (agent/twin), the transport
// choice (agent/network), systemd (agent/sdnotify), the telemetry pipeline
// (telemetry) and renewal (renewal). docs/architecture.md says who owns
// what. Only agent, its parts and cmd log. Importers: cmd/gwagent.
package agent
