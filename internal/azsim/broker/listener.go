// Package broker holds what azsim's two embedded mochi-mqtt brokers (DPS and
// the hub) share: a TLS listener and a direct PUBLISH to one client.
package broker

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
)

// Listener is a mochi listener over an already bound TCP socket. It does the
// TLS handshake itself, under a deadline, before handing the connection to
// the broker, and closes every connection it handed out on Close, including
// ones that never sent CONNECT (mochi only knows connected clients).
type Listener struct {
	handshakeTimeout time.Duration
	id               string
	nl               net.Listener
	conf             *tls.Config

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	done  bool
}

var _ listeners.Listener = (*Listener)(nil)

// New wraps a bound socket; handshakes (and the wait for CONNECT) are
// bounded by handshake.
func New(id string, nl net.Listener, conf *tls.Config, handshake time.Duration) *Listener {
	ctx, cancel := context.WithCancel(context.Background())
	return &Listener{handshakeTimeout: handshake, id: id, nl: nl, conf: conf, ctx: ctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
}

func (l *Listener) Init(*slog.Logger) error { return nil }
func (l *Listener) ID() string              { return l.id }
func (l *Listener) Address() string         { return l.nl.Addr().String() }
func (l *Listener) Protocol() string        { return "tcp+tls" }

func (l *Listener) Serve(establish listeners.EstablishFn) {
	for {
		c, err := l.nl.Accept()
		if err != nil {
			return
		}
		if !l.track(c) {
			c.Close()
			return
		}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer l.untrack(c)
			tc := tls.Server(c, l.conf)
			_ = c.SetDeadline(time.Now().Add(l.handshakeTimeout))
			hctx, cancel := context.WithTimeout(l.ctx, l.handshakeTimeout)
			err := tc.HandshakeContext(hctx)
			cancel()
			if err != nil {
				tc.Close()
				return
			}
			// The deadline stays until CONNECT is read; the broker then sets
			// its own from the keep-alive.
			_ = establish(l.id, tc)
			tc.Close()
		}()
	}
}

func (l *Listener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done {
		return false
	}
	l.conns[c] = struct{}{}
	return true
}

func (l *Listener) untrack(c net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.conns, c)
}

func (l *Listener) Close(closeClients listeners.CloseFn) {
	l.mu.Lock()
	if l.done {
		l.mu.Unlock()
		return
	}
	l.done = true
	l.mu.Unlock()
	l.cancel()
	_ = l.nl.Close()
	closeClients(l.id)
	l.mu.Lock()
	for c := range l.conns {
		_ = c.Close()
	}
	l.mu.Unlock()
}

// Wait blocks until every connection goroutine has returned.
func (l *Listener) Wait() { l.wg.Wait() }

// Addr is the bound address.
func (l *Listener) Addr() net.Addr { return l.nl.Addr() }

// Quiesce closes the listeners (nil ones are skipped) and waits until every
// connection they handed to the broker has ended, before the broker itself
// is closed: mochi's Server.Close waits on a WaitGroup that each new
// connection adds to, and an Add racing with that Wait is a data race (seen
// under -race when a client connected during shutdown). Connections are
// closed directly, so no broker callback is needed.
func Quiesce(ln *Listener, ws *WebSocketListener) {
	noop := func(string) {}
	if ln != nil {
		ln.Close(noop)
	}
	if ws != nil {
		ws.Close(noop)
	}
	if ln != nil {
		ln.Wait()
	}
	if ws != nil {
		ws.Wait()
	}
}
