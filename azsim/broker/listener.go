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
	conns  connSet
}

var _ listeners.Listener = (*Listener)(nil)

// New wraps a bound socket; handshakes (and the wait for CONNECT) are
// bounded by handshake.
func New(id string, nl net.Listener, conf *tls.Config, handshake time.Duration) *Listener {
	ctx, cancel := context.WithCancel(context.Background())
	return &Listener{handshakeTimeout: handshake, id: id, nl: nl, conf: conf, ctx: ctx, cancel: cancel}
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
		if !l.conns.add(c) {
			c.Close()
			return
		}
		go func() {
			defer l.conns.remove(c)
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

func (l *Listener) Close(closeClients listeners.CloseFn) {
	if !l.conns.shut() {
		return
	}
	l.cancel()
	_ = l.nl.Close()
	closeClients(l.id)
	l.conns.closeAll()
}

// Wait blocks until every connection goroutine has returned.
func (l *Listener) Wait() { l.conns.wg.Wait() }

// connSet is the connections a listener handed out: Close ends them all
// (mochi knows only clients that sent CONNECT) and Wait waits for their
// goroutines. After shut, no connection is taken any more.
type connSet struct {
	mu   sync.Mutex
	live map[net.Conn]struct{}
	done bool
	wg   sync.WaitGroup
}

// add takes c, or reports false once the set is shut.
func (s *connSet) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return false
	}
	if s.live == nil {
		s.live = map[net.Conn]struct{}{}
	}
	s.live[c] = struct{}{}
	s.wg.Add(1)
	return true
}

// remove is called when c's goroutine is done with it.
func (s *connSet) remove(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.live, c)
	s.wg.Done()
}

// shut stops taking connections; it reports false if it was shut already.
func (s *connSet) shut() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return false
	}
	s.done = true
	return true
}

// closeAll closes every live connection.
func (s *connSet) closeAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.live {
		_ = c.Close()
	}
}

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
