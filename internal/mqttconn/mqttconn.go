// Package mqttconn opens the network connection under gwagent's MQTT
// sessions to DPS and IoT Hub: MQTT over TLS on 8883 or MQTT over WebSockets
// over TLS on 443 (path /$iothub/websocket, subprotocol mqtt), either one
// directly or through an HTTP proxy's CONNECT tunnel, with one timeout and
// one error classification. provisioning (DPS) and transport (the hub) both
// use it through Configure, so every connection option exists once.
//
// A leaf utility like tlsconf: of gwagent's it imports only internal/clock
// (the keep-alive's timer), and the TLS configuration (trust, client
// certificate from any crypto.Signer) is the caller's. It never logs.
package mqttconn

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"sync/atomic"
	"syscall"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/internal/clock"
)

// Transport is how MQTT reaches the server.
type Transport string

// Transports. Auto is a policy, not a wire format: try one, fall back to
// the other when the first cannot be reached.
const (
	MQTT      Transport = "mqtt"      // MQTT over TLS, port 8883
	WebSocket Transport = "websocket" // MQTT over WebSockets over TLS, port 443
	Auto      Transport = "auto"
)

// WebSocketPath is the path Azure serves MQTT over WebSockets on, for DPS
// and IoT Hub alike; Subprotocol is the WebSocket subprotocol it requires.
const (
	WebSocketPath = "/$iothub/websocket"
	Subprotocol   = "mqtt"
)

// ParseTransport reads a transport name as written in the config.
func ParseTransport(s string) (Transport, error) {
	switch t := Transport(s); t {
	case MQTT, WebSocket, Auto:
		return t, nil
	case "":
		return Auto, nil
	}
	return "", fmt.Errorf("transport %q: use \"mqtt\" (port 8883), \"websocket\" (port 443) or \"auto\"", s)
}

// Options says how to reach one server.
type Options struct {
	// Host is the server as configured: host, or host:port for MQTT over
	// TLS (default port 8883).
	Host string
	// WebSocketPort is the port of MQTT over WebSockets; default 443. Only
	// emulators and tests serve it elsewhere.
	WebSocketPort int
	// Transport is MQTT, WebSocket or Auto (the zero value means Auto).
	Transport Transport
	// Prefer is, in Auto, the transport to try first: MQTT unless
	// WebSockets is what worked last time. Ignored otherwise.
	Prefer Transport
	// TLS is the client configuration (trust, server name, client
	// certificate). Required; it is used unchanged for both transports.
	TLS *tls.Config
	// Proxy picks the HTTP proxy for a target host:port; nil means none.
	Proxy ProxyFunc
	// Timeout bounds one connection attempt (proxy, TCP, TLS and WebSocket
	// handshakes); default 30 s. In Auto, an attempt that another one
	// follows gets at most FallbackTimeout (default 10 s), so a firewall
	// that silently drops 8883 costs seconds, not minutes.
	Timeout         time.Duration
	FallbackTimeout time.Duration
	// Dial opens TCP connections; default a net.Dialer. Tests use it.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Dialer opens the connections of one paho client. Used tells which
// transport the last connection went over.
type Dialer struct {
	ctx  context.Context
	o    Options
	used atomic.Value // Transport
}

// Configure points paho's options at o.Host over the configured transport:
// it sets the broker URL, the TLS config and a custom open-connection
// function, so paho never dials by itself (paho's own proxy support is
// SOCKS from the environment only). ctx bounds every connection attempt;
// cancelling it aborts a dial in progress.
//
// It also takes over the keep-alive and ping timeout already set in opts
// (SetKeepAlive, SetPingTimeout; call Configure after them): paho's own
// pinger is turned off, and the connection keeps the keep-alive itself
// (keepalive.go), with the same value in the CONNECT.
func Configure(ctx context.Context, opts *mqtt.ClientOptions, o Options) (*Dialer, error) {
	if o.TLS == nil {
		return nil, errors.New("mqttconn: no TLS configuration")
	}
	switch o.Transport {
	case "":
		o.Transport = Auto
	case MQTT, WebSocket, Auto:
	default:
		return nil, fmt.Errorf("mqttconn: unknown transport %q", o.Transport)
	}
	if o.Prefer != WebSocket {
		o.Prefer = MQTT
	}
	if o.WebSocketPort == 0 {
		o.WebSocketPort = 443
	}
	if o.Timeout == 0 {
		o.Timeout = 30 * time.Second
	}
	if o.FallbackTimeout == 0 {
		o.FallbackTimeout = 10 * time.Second
	}
	if o.Dial == nil {
		o.Dial = (&net.Dialer{KeepAlive: 30 * time.Second}).DialContext
	}
	d := &Dialer{ctx: ctx, o: o}
	first := d.order()[0]
	// paho only reads the URL for its logs and for the protocol-level
	// defaults; the custom function below does all the dialing.
	opts.AddBroker(d.url(first))
	opts.SetTLSConfig(o.TLS)
	// paho's connect timeout runs from before the open to the CONNACK:
	// the open's whole budget (both attempts in Auto) plus time for CONNACK.
	budget := o.Timeout
	if len(d.order()) > 1 {
		budget += o.FallbackTimeout
	}
	opts.SetConnectTimeout(budget + 30*time.Second)
	every, wait := time.Duration(opts.KeepAlive)*time.Second, opts.PingTimeout
	if every > 0 {
		opts.SetKeepAlive(0)
	}
	opts.SetCustomOpenConnectionFn(func(*url.URL, mqtt.ClientOptions) (net.Conn, error) {
		c, err := d.Open(d.ctx)
		if err != nil {
			return nil, err
		}
		// Over WebSockets every Write is a frame of its own; they stay
		// one packet each.
		if d.Used() == MQTT {
			c = coalesce(c)
		}
		if every > 0 {
			// On the wall clock, as every bound on network I/O here: the
			// server counts the keep-alive in wall time, and an agent
			// run on a fake clock (tests that leap ahead) must ping as
			// paho did, neither more nor less.
			c = keepAlive(c, clock.Real{}, every, wait)
		}
		return c, nil
	})
	return d, nil
}

// Used is the transport of the last connection opened, or "" before one.
func (d *Dialer) Used() Transport {
	t, _ := d.used.Load().(Transport)
	return t
}

func (d *Dialer) order() []Transport {
	switch d.o.Transport {
	case MQTT:
		return []Transport{MQTT}
	case WebSocket:
		return []Transport{WebSocket}
	}
	if d.o.Prefer == WebSocket {
		return []Transport{WebSocket, MQTT}
	}
	return []Transport{MQTT, WebSocket}
}

// addr is the host:port to reach for t.
func (d *Dialer) addr(t Transport) string {
	host, port := d.o.Host, "8883"
	if h, p, err := net.SplitHostPort(d.o.Host); err == nil {
		host, port = h, p
	}
	if t == WebSocket {
		port = fmt.Sprint(d.o.WebSocketPort)
	}
	return net.JoinHostPort(host, port)
}

func (d *Dialer) url(t Transport) string {
	if t == WebSocket {
		return "wss://" + d.addr(t) + WebSocketPath
	}
	return "tls://" + d.addr(t)
}

// Open opens one connection: in Auto, the preferred transport first and
// the other when the first cannot be reached. Errors name every attempt.
func (d *Dialer) Open(ctx context.Context) (net.Conn, error) {
	order := d.order()
	var errs []error
	for i, t := range order {
		timeout := d.o.Timeout
		last := i == len(order)-1
		if !last {
			timeout = min(timeout, d.o.FallbackTimeout)
		}
		c, err := d.open(ctx, t, timeout)
		if err == nil {
			d.used.Store(t)
			return c, nil
		}
		errs = append(errs, err)
		if last || !worthFallback(ctx, err) {
			break
		}
	}
	return nil, errors.Join(errs...)
}

func (d *Dialer) open(ctx context.Context, t Transport, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	target := d.addr(t)
	if t == WebSocket {
		c, err := dialWebSocket(ctx, "wss://"+target+WebSocketPath, d.tlsDial)
		if err != nil {
			return nil, &DialError{Transport: t, Addr: target, Err: err}
		}
		return c, nil
	}
	c, err := d.tlsDial(ctx, "tcp", target)
	if err != nil {
		return nil, &DialError{Transport: t, Addr: target, Err: err}
	}
	return c, nil
}

// tlsDial reaches target directly or through the proxy and completes the
// TLS handshake with the client certificate: the same under raw MQTT and
// under WebSockets.
func (d *Dialer) tlsDial(ctx context.Context, _, target string) (net.Conn, error) {
	var proxy *url.URL
	if d.o.Proxy != nil {
		p, err := d.o.Proxy(target)
		if err != nil {
			return nil, err
		}
		proxy = p
	}
	var raw net.Conn
	var err error
	if proxy != nil {
		raw, err = tunnel(ctx, proxy, target, d.o.Dial)
	} else {
		raw, err = d.o.Dial(ctx, "tcp", target)
	}
	if err != nil {
		return nil, err
	}
	tc := tls.Client(raw, d.o.TLS)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		var alert tls.AlertError
		if proxy != nil && !errors.As(err, &alert) && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			// The server would have sent an alert; a silent close under
			// a tunnel is the proxy's doing (filters, idle limits).
			return nil, &ProxyError{Proxy: proxy.Redacted(), Target: target, Closed: true, Err: fmt.Errorf("during the TLS handshake: %w", err)}
		}
		return nil, fmt.Errorf("tls handshake: %w", err)
	}
	return tc, nil
}

// DialError is a failed connection attempt over one transport.
type DialError struct {
	Transport Transport
	Addr      string
	Err       error
}

func (e *DialError) Error() string {
	what := "MQTT over TLS"
	if e.Transport == WebSocket {
		what = "MQTT over WebSockets"
	}
	return fmt.Sprintf("%s to %s: %v", what, e.Addr, e.Err)
}

func (e *DialError) Unwrap() error { return e.Err }

// worthFallback says whether the other transport might get through where
// this one failed: not when the caller gave up, the server's certificate is
// untrusted (the same server answers on both), or the proxy itself is
// unreachable or refuses our credentials.
func worthFallback(ctx context.Context, err error) bool {
	if ctx.Err() != nil {
		return false
	}
	var cve *tls.CertificateVerificationError
	if errors.As(err, &cve) {
		return false
	}
	var pe *ProxyError
	if errors.As(err, &pe) && (pe.Status == 0 && !pe.Closed || pe.authFailed()) {
		return false
	}
	return true
}

// Probe checks that t can reach o.Host: it opens one connection (proxy
// tunnel, TLS handshake, WebSocket upgrade for WebSocket) and closes it
// without speaking MQTT. Auto mode uses it to notice that 8883 opened again
// while a WebSocket session runs. o.Transport and o.Prefer are ignored.
func Probe(ctx context.Context, o Options, t Transport) error {
	if t != MQTT && t != WebSocket {
		return fmt.Errorf("mqttconn: probe: unknown transport %q", t)
	}
	o.Transport = t
	d, err := Configure(ctx, mqtt.NewClientOptions(), o)
	if err != nil {
		return err
	}
	c, err := d.Open(ctx)
	if err != nil {
		return err
	}
	return c.Close()
}

// DialTLS opens a TLS connection to target (host:port) the way the MQTT
// transports do: through the proxy o.Proxy picks for it, under o.Timeout
// (default 30 s), with o.TLS. For DPS's HTTPS endpoint, which shares the
// proxy rules of the MQTT connections.
func DialTLS(ctx context.Context, o Options, target string) (*tls.Conn, error) {
	if o.TLS == nil {
		return nil, errors.New("mqttconn: no TLS configuration")
	}
	if o.Timeout == 0 {
		o.Timeout = 30 * time.Second
	}
	if o.Dial == nil {
		o.Dial = (&net.Dialer{KeepAlive: 30 * time.Second}).DialContext
	}
	ctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	d := &Dialer{o: o}
	c, err := d.tlsDial(ctx, "tcp", target)
	if err != nil {
		return nil, err
	}
	return c.(*tls.Conn), nil
}
