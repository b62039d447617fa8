package broker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"time"

	"github.com/gorilla/websocket"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/gwagent/gwagent/internal/wsstream"
)

// WebSocketPath and Subprotocol are what Azure's DPS and IoT Hub require of
// MQTT over WebSockets: any other path is 404, an upgrade that does not
// offer the mqtt subprotocol is refused.
const (
	WebSocketPath = "/$iothub/websocket"
	Subprotocol   = "mqtt"
)

// WebSocketListener serves MQTT over WebSockets over TLS on an already bound
// socket, with the same TLS configuration (and so the same client-certificate
// rules) as the raw listener. mochi's own listeners.Websocket cannot be used:
// it binds its address itself (so a :0 port cannot be learnt), answers every
// path and upgrades without the subprotocol, and hides the TLS connection the
// hub reads the client certificate from.
type WebSocketListener struct {
	id    string
	nl    net.Listener
	srv   *http.Server
	up    websocket.Upgrader
	conns connSet

	establish listeners.EstablishFn
}

var _ listeners.Listener = (*WebSocketListener)(nil)

// NewWebSocket wraps a bound socket; the TLS and HTTP upgrade handshakes
// are bounded by handshake.
func NewWebSocket(id string, nl net.Listener, conf *tls.Config, handshake time.Duration) *WebSocketListener {
	l := &WebSocketListener{id: id, nl: nl}
	l.up = websocket.Upgrader{
		HandshakeTimeout: handshake,
		Subprotocols:     []string{Subprotocol},
		// Devices send no Origin; browsers are not clients of this server.
		CheckOrigin: func(*http.Request) bool { return true },
		Error: func(w http.ResponseWriter, _ *http.Request, status int, reason error) {
			http.Error(w, reason.Error(), status)
		},
	}
	l.srv = &http.Server{
		Handler:           l,
		TLSConfig:         conf.Clone(),
		ReadHeaderTimeout: handshake,
		// HTTP/1.1 only: the upgrade needs it.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		// A library of ours must not log.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	return l
}

func (l *WebSocketListener) Init(*slog.Logger) error { return nil }
func (l *WebSocketListener) ID() string              { return l.id }
func (l *WebSocketListener) Address() string         { return l.nl.Addr().String() }
func (l *WebSocketListener) Protocol() string        { return "wss" }

// Addr is the bound address.
func (l *WebSocketListener) Addr() net.Addr { return l.nl.Addr() }

func (l *WebSocketListener) Serve(establish listeners.EstablishFn) {
	l.establish = establish
	_ = l.srv.ServeTLS(l.nl, "", "")
}

// ServeHTTP checks the path and the subprotocol, upgrades, and hands the
// stream to the broker.
func (l *WebSocketListener) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != WebSocketPath {
		http.Error(w, "not found: MQTT over WebSockets is served at "+WebSocketPath, http.StatusNotFound)
		return
	}
	if !slices.Contains(websocket.Subprotocols(r), Subprotocol) {
		http.Error(w, "the WebSocket subprotocol must be "+Subprotocol, http.StatusBadRequest)
		return
	}
	ws, err := l.up.Upgrade(w, r, nil)
	if err != nil {
		return // the upgrader answered
	}
	c := &peerConn{Conn: wsstream.New(ws), state: *r.TLS}
	if !l.conns.add(c) {
		c.Close()
		return
	}
	defer l.conns.remove(c)
	// The deadline stays until CONNECT is read, as on the raw listener; the
	// broker then sets its own from the keep-alive.
	_ = c.SetDeadline(time.Now().Add(l.up.HandshakeTimeout))
	_ = l.establish(l.id, c)
	c.Close()
}

// peerConn keeps the TLS state under the WebSocket so the broker's hooks
// read the client certificate as they do on raw TLS (see PeerCertificates).
type peerConn struct {
	net.Conn
	state tls.ConnectionState
}

func (c *peerConn) ConnectionState() tls.ConnectionState { return c.state }

// PeerCertificates is the client's certificate chain on either listener:
// the TLS connection itself, or the TLS under a WebSocket.
func PeerCertificates(c net.Conn) []*x509.Certificate {
	if cs, ok := c.(interface{ ConnectionState() tls.ConnectionState }); ok {
		return cs.ConnectionState().PeerCertificates
	}
	return nil
}

func (l *WebSocketListener) Close(closeClients listeners.CloseFn) {
	if !l.conns.shut() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = l.srv.Shutdown(ctx) // upgraded connections are hijacked: closed below
	closeClients(l.id)
	l.conns.closeAll()
}

// Wait blocks until every connection has been handed back.
func (l *WebSocketListener) Wait() { l.conns.wg.Wait() }

// ListenWebSocket binds addr and adds a WebSocket listener for it to srv
// (before srv.Serve).
func ListenWebSocket(srv *mqtt.Server, id, addr string, conf *tls.Config, handshake time.Duration) (*WebSocketListener, error) {
	nl, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for WebSockets on %s: %w (is the port in use?)", addr, err)
	}
	l := NewWebSocket(id, nl, conf, handshake)
	if err := srv.AddListener(l); err != nil {
		nl.Close()
		return nil, err
	}
	return l, nil
}
