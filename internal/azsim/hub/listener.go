package hub

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
)

// listener is a mochi listener over an already bound TCP socket. It does the
// TLS handshake itself, under a deadline, before handing the connection to
// the broker, and closes every connection it handed out on Close, including
// ones that never sent CONNECT (mochi only knows connected clients).
type listener struct {
	id   string
	nl   net.Listener
	conf *tls.Config

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	done  bool
}

var _ listeners.Listener = (*listener)(nil)

func newListener(id string, nl net.Listener, conf *tls.Config) *listener {
	ctx, cancel := context.WithCancel(context.Background())
	return &listener{id: id, nl: nl, conf: conf, ctx: ctx, cancel: cancel, conns: map[net.Conn]struct{}{}}
}

func (l *listener) Init(*slog.Logger) error { return nil }
func (l *listener) ID() string              { return l.id }
func (l *listener) Address() string         { return l.nl.Addr().String() }
func (l *listener) Protocol() string        { return "tcp+tls" }

func (l *listener) Serve(establish listeners.EstablishFn) {
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
			_ = c.SetDeadline(time.Now().Add(handshakeTimeout))
			hctx, cancel := context.WithTimeout(l.ctx, handshakeTimeout)
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

func (l *listener) track(c net.Conn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.done {
		return false
	}
	l.conns[c] = struct{}{}
	return true
}

func (l *listener) untrack(c net.Conn) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.conns, c)
}

func (l *listener) Close(closeClients listeners.CloseFn) {
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

// wait blocks until every connection goroutine has returned.
func (l *listener) wait() { l.wg.Wait() }
