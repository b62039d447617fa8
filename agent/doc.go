// Package agent is gwagent's lifecycle: it loads and reloads the config,
// opens the key stores, provisions through DPS, and (in later parts) owns
// the hub session, the renewal schedule, health and systemd notification.
// Only agent and cmd log. Importers: cmd/gwagent.
package agent
