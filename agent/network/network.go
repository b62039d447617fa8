// Package network is how the agent reaches DPS and IoT Hub: the [network]
// section of the config (transport, proxy, WebSocket ports), the choice of
// transport for each connection (MQTT on 8883, WebSockets on 443, or auto:
// what worked last first, remembered in STATE_DIR/transport.json), and, in
// auto mode, the periodic check beside a session over WebSockets whether
// 8883 can be reached again.
//
// It is one of the agent's own parts: only agent/ imports it. It builds
// mqttconn.Options and nothing else of the connection; it times the
// re-probe on the clock it is handed and logs only through the logger it
// is handed. Everything here runs on the caller's goroutine; WatchMQTT runs
// on one the agent owns, beside the session.
package network

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/clock"
	"github.com/gwagent/gwagent/internal/duration"
	"github.com/gwagent/gwagent/internal/mqttconn"
	"github.com/gwagent/gwagent/internal/tlsconf"
)

// Config is the config's [network] section. Reloadable: a change ends the
// current hub session and the next one uses it.
type Config struct {
	// Transport is "mqtt" (MQTT over TLS, port 8883), "websocket" (MQTT
	// over WebSockets, port 443) or "auto" (default): 8883 first, WebSockets
	// when 8883 cannot be reached; what worked is remembered in the state
	// directory and 8883 is tried again every MQTTReprobe.
	Transport string `toml:"transport"`
	// Proxy is an HTTP proxy for CONNECT tunnels,
	// http://[user:password@]host:port. Empty: https_proxy (or HTTPS_PROXY)
	// from the environment, if set. Keep the config file 0600 when it holds
	// a password; it never appears in logs, errors or status.
	Proxy string `toml:"proxy"`
	// NoProxy lists hosts reached directly (comma-separated: names, which
	// match their subdomains, IPs, CIDRs, "*"). Empty: no_proxy (or NO_PROXY)
	// from the environment.
	NoProxy string `toml:"no_proxy"`
	// MQTTReprobe: in auto, after WebSockets worked, how often 8883 is
	// tried again (a TLS handshake beside the running session; when it
	// works, the agent reconnects over MQTT); default 6h.
	MQTTReprobe duration.Duration `toml:"mqtt_reprobe"`
	// DPSWebSocketPort and HubWebSocketPort are the WebSocket ports; default
	// 443 as Azure serves them. Only emulators (azsim) use others.
	DPSWebSocketPort int `toml:"dps_websocket_port"`
	HubWebSocketPort int `toml:"hub_websocket_port"`
}

// Defaults fills in what the config left out.
func (n *Config) Defaults() {
	if n.Transport == "" {
		n.Transport = string(mqttconn.Auto)
	}
	if n.MQTTReprobe.Duration == 0 {
		n.MQTTReprobe.Duration = 6 * time.Hour
	}
	if n.DPSWebSocketPort == 0 {
		n.DPSWebSocketPort = 443
	}
	if n.HubWebSocketPort == 0 {
		n.HubWebSocketPort = 443
	}
}

// Validate lists what is wrong with the section, each error naming its key.
func (n *Config) Validate() []error {
	var errs []error
	if _, err := mqttconn.ParseTransport(n.Transport); err != nil {
		errs = append(errs, fmt.Errorf("[network] %w", err))
	}
	if _, err := mqttconn.ParseProxy(n.Proxy); err != nil {
		errs = append(errs, fmt.Errorf("[network] %w", err))
	}
	if n.MQTTReprobe.Duration < 10*time.Second {
		errs = append(errs, fmt.Errorf("[network] mqtt_reprobe %s: use at least 10s", n.MQTTReprobe.Duration))
	}
	for name, p := range map[string]int{"dps_websocket_port": n.DPSWebSocketPort, "hub_websocket_port": n.HubWebSocketPort} {
		if p < 1 || p > 65535 {
			errs = append(errs, fmt.Errorf("[network] %s %d: not a TCP port", name, p))
		}
	}
	return errs
}

// proxyFunc is the proxy rule: the config's proxy, else the environment's.
func (n *Config) proxyFunc(getenv func(string) string) (mqttconn.ProxyFunc, error) {
	noProxy := n.NoProxy
	if noProxy == "" {
		noProxy = firstEnv(getenv, "no_proxy", "NO_PROXY")
	}
	if n.Proxy != "" {
		u, err := mqttconn.ParseProxy(n.Proxy)
		if err != nil {
			return nil, err
		}
		return mqttconn.Proxy(u, noProxy), nil
	}
	u, err := mqttconn.ParseProxy(firstEnv(getenv, "https_proxy", "HTTPS_PROXY"))
	if err != nil {
		return nil, fmt.Errorf("environment https_proxy: %w", err)
	}
	return mqttconn.Proxy(u, noProxy), nil
}

func firstEnv(getenv func(string) string, names ...string) string {
	for _, n := range names {
		if v := getenv(n); v != "" {
			return v
		}
	}
	return ""
}

// memory is what auto mode learnt, in STATE_DIR/transport.json: the
// transport that worked last and when 8883 was last tried after WebSockets
// had worked. Written only when it changes (flash).
type memory struct {
	Transport mqttconn.Transport `json:"transport"`
	ProbedAt  time.Time          `json:"mqttProbedAt,omitzero"`
}

// maxMemoryBytes bounds what is read of transport.json (it holds ~80 bytes).
const maxMemoryBytes = 4096

func memoryPath(stateDir string) string { return filepath.Join(stateDir, "transport.json") }

// readMemory never fails: a missing, damaged or special file means nothing
// learnt (read regular and bounded, it never blocks).
func readMemory(stateDir string) memory {
	var m memory
	b, err := atomicfile.ReadRegular(memoryPath(stateDir), maxMemoryBytes)
	if err != nil || json.Unmarshal(b, &m) != nil || m.Transport != mqttconn.WebSocket {
		return memory{Transport: mqttconn.MQTT}
	}
	return m
}

func writeMemory(stateDir string, m memory) error {
	b, _ := json.Marshal(m)
	return atomicfile.Write(memoryPath(stateDir), b, 0o600)
}

// Choice is how one connection to DPS or the hub goes: its options, and in
// auto mode what to remember once it worked.
type Choice struct {
	// Options are for mqttconn (Host and TLS are the caller's to fill in).
	Options  mqttconn.Options
	cfg      Config
	stateDir string
	now      time.Time
	probe    bool // 8883 gets another chance after WebSockets worked
}

// Choose picks the options for one dial at now, with WebSockets on wsPort.
// In auto mode, what worked last is tried first, except that after
// MQTTReprobe 8883 gets another chance.
func Choose(cfg Config, stateDir string, now time.Time, wsPort int) (*Choice, error) {
	t, err := mqttconn.ParseTransport(cfg.Transport)
	if err != nil {
		return nil, err
	}
	proxy, err := cfg.proxyFunc(os.Getenv)
	if err != nil {
		return nil, err
	}
	c := &Choice{cfg: cfg, stateDir: stateDir, now: now,
		Options: mqttconn.Options{Transport: t, Proxy: proxy, WebSocketPort: wsPort, Prefer: mqttconn.MQTT}}
	if t == mqttconn.Auto {
		m := readMemory(stateDir)
		c.Options.Prefer = m.Transport
		// A probe time in the future is a clock that went back (a board
		// without RTC before NTP) or a damaged file: probe now rather
		// than stay on WebSockets until the clock catches up.
		if since := now.Sub(m.ProbedAt); m.Transport == mqttconn.WebSocket && (since >= cfg.MQTTReprobe.Duration || since < 0) {
			c.Options.Prefer, c.probe = mqttconn.MQTT, true
		}
	}
	return c, nil
}

// Worked records, in auto mode, what the connection went over (and that
// 8883 was just probed), and logs a transport other than the one tried
// first. It reports whether 8883 wants watching (WatchMQTT): auto mode on
// WebSockets.
func (c *Choice) Worked(used mqttconn.Transport, log *slog.Logger) (watch bool) {
	if err := remember(c.cfg, c.stateDir, c.now, used, c.probe); err != nil {
		log.Warn("cannot remember the transport that worked", "err", err)
	}
	auto := c.Options.Transport == mqttconn.Auto
	if c.probe || used != c.Options.Prefer && auto {
		log.Info("transport chosen", "transport", string(used), "tried_first", string(c.Options.Prefer))
	}
	return auto && used == mqttconn.WebSocket
}

// remember records, in auto mode, what a connection went over and whether
// 8883 was just probed.
func remember(cfg Config, stateDir string, now time.Time, used mqttconn.Transport, probed bool) error {
	if cfg.Transport != string(mqttconn.Auto) || used == "" {
		return nil
	}
	m := readMemory(stateDir)
	next := m
	next.Transport = used
	if used == mqttconn.WebSocket && (probed || m.Transport != mqttconn.WebSocket) {
		next.ProbedAt = now.UTC()
	}
	if used == mqttconn.MQTT {
		next.ProbedAt = time.Time{}
	}
	if next == m {
		return nil
	}
	if used == mqttconn.MQTT {
		// Back to the default: nothing to remember.
		if err := os.Remove(memoryPath(stateDir)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	return writeMemory(stateDir, next)
}

// WatchMQTT runs, in auto mode, beside a session over WebSockets until
// done is closed or ctx ends: every MQTTReprobe it checks whether 8883 can
// be reached at host (a TLS handshake, no MQTT, no client key use) and,
// once it can, forgets WebSockets and calls reconnect so the next session
// goes over MQTT. Sessions last weeks; without this a site that opened 8883
// would never be noticed.
func (c *Choice) WatchMQTT(ctx context.Context, done <-chan struct{}, host string, roots *x509.CertPool, clk clock.Clock, log *slog.Logger, reconnect func()) {
	every := c.cfg.MQTTReprobe.Duration
	t, tC := clk.NewTimer(every)
	defer t.Stop()
	name := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		name = h
	}
	tlsCfg, err := tlsconf.Client(name, roots, nil, nil)
	if err != nil {
		return
	}
	o := c.Options
	o.Host, o.TLS = host, tlsCfg
	for {
		select {
		case <-done:
			return
		case <-ctx.Done():
			return
		case <-tC:
		}
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := mqttconn.Probe(pctx, o, mqttconn.MQTT)
		cancel()
		if err != nil {
			log.Debug("port 8883 still unreachable; staying on WebSockets", "err", err)
			t.Reset(every)
			continue
		}
		log.Info("port 8883 is reachable again; reconnecting over MQTT")
		if err := remember(c.cfg, c.stateDir, clk.Now(), mqttconn.MQTT, true); err != nil {
			log.Warn("cannot remember the transport", "err", err)
		}
		reconnect()
		return
	}
}
