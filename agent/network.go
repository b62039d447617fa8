package agent

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/gwagent/gwagent/internal/atomicfile"
	"github.com/gwagent/gwagent/internal/mqttconn"
	"github.com/gwagent/gwagent/internal/tlsconf"
	"github.com/gwagent/gwagent/transport"
)

// NetworkConfig is how the agent reaches DPS and IoT Hub. Reloadable: a
// change ends the current hub session and the next one uses it.
type NetworkConfig struct {
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
	MQTTReprobe Duration `toml:"mqtt_reprobe"`
	// DPSWebSocketPort and HubWebSocketPort are the WebSocket ports; default
	// 443 as Azure serves them. Only emulators (azsim) use others.
	DPSWebSocketPort int `toml:"dps_websocket_port"`
	HubWebSocketPort int `toml:"hub_websocket_port"`
}

func (n *NetworkConfig) defaults() {
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

func (n *NetworkConfig) validate() []error {
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
func (n *NetworkConfig) proxyFunc(getenv func(string) string) (mqttconn.ProxyFunc, error) {
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

// transportMemory is what auto mode learnt, in STATE_DIR/transport.json:
// the transport that worked last and when 8883 was last tried after
// WebSockets had worked. Written only when it changes (flash).
type transportMemory struct {
	Transport mqttconn.Transport `json:"transport"`
	ProbedAt  time.Time          `json:"mqttProbedAt,omitzero"`
}

func memoryPath(stateDir string) string { return filepath.Join(stateDir, "transport.json") }

// readMemory never fails: a missing or damaged file means nothing learnt.
func readMemory(stateDir string) transportMemory {
	var m transportMemory
	b, err := readConfigFile(memoryPath(stateDir)) // regular, bounded, never blocks
	if err != nil || json.Unmarshal(b, &m) != nil || m.Transport != mqttconn.WebSocket {
		return transportMemory{Transport: mqttconn.MQTT}
	}
	return m
}

func writeMemory(stateDir string, m transportMemory) error {
	b, _ := json.Marshal(m)
	return atomicfile.Write(memoryPath(stateDir), b, 0o600)
}

// networkOptions are the connection options for one dial of DPS or the hub.
// In auto mode, what worked last is tried first, except that after
// MQTTReprobe 8883 gets another chance (probe reports that it did, for
// remember to record).
func networkOptions(cfg *Config, now time.Time, wsPort int) (o mqttconn.Options, probe bool, err error) {
	t, err := mqttconn.ParseTransport(cfg.Network.Transport)
	if err != nil {
		return o, false, err
	}
	proxy, err := cfg.Network.proxyFunc(os.Getenv)
	if err != nil {
		return o, false, err
	}
	o = mqttconn.Options{Transport: t, Proxy: proxy, WebSocketPort: wsPort, Prefer: mqttconn.MQTT}
	if t == mqttconn.Auto {
		m := readMemory(cfg.StateDir)
		o.Prefer = m.Transport
		// A probe time in the future is a clock that went back (a board
		// without RTC before NTP) or a damaged file: probe now rather
		// than stay on WebSockets until the clock catches up.
		if since := now.Sub(m.ProbedAt); m.Transport == mqttconn.WebSocket && (since >= cfg.Network.MQTTReprobe.Duration || since < 0) {
			o.Prefer, probe = mqttconn.MQTT, true
		}
	}
	return o, probe, nil
}

// rememberTransport records, in auto mode, what a connection went over and
// whether 8883 was just probed.
func rememberTransport(cfg *Config, now time.Time, used mqttconn.Transport, probed bool) error {
	if cfg.Network.Transport != string(mqttconn.Auto) || used == "" {
		return nil
	}
	m := readMemory(cfg.StateDir)
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
		if err := os.Remove(memoryPath(cfg.StateDir)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	return writeMemory(cfg.StateDir, next)
}

// watchMQTT runs, in auto mode, beside a session over WebSockets: every
// MQTTReprobe it checks whether 8883 can be reached (a TLS handshake, no
// MQTT, no client key use) and, once it can, forgets WebSockets and ends the
// session so the next one goes over MQTT. Sessions last weeks; without this
// a site that opened 8883 would never be noticed.
func (a *Agent) watchMQTT(ctx context.Context, sess *transport.Session, cfg *Config, host string, roots *x509.CertPool, o mqttconn.Options) {
	every := cfg.Network.MQTTReprobe.Duration
	t := time.NewTimer(every)
	defer t.Stop()
	name := host
	if h, _, err := net.SplitHostPort(host); err == nil {
		name = h
	}
	tlsCfg, err := tlsconf.Client(name, roots, nil, nil)
	if err != nil {
		return
	}
	o.Host, o.TLS = host, tlsCfg
	for {
		select {
		case <-sess.Done():
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := mqttconn.Probe(pctx, o, mqttconn.MQTT)
		cancel()
		if err != nil {
			a.log.Debug("port 8883 still unreachable; staying on WebSockets", "err", err)
			t.Reset(every)
			continue
		}
		a.log.Info("port 8883 is reachable again; reconnecting over MQTT")
		if err := rememberTransport(cfg, a.clock.Now(), mqttconn.MQTT, true); err != nil {
			a.log.Warn("cannot remember the transport", "err", err)
		}
		a.mu.Lock()
		cur, end := a.sess, a.endSess
		a.mu.Unlock()
		if cur == sess && end != nil {
			end()
		}
		return
	}
}
