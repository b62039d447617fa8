package transport_test

import (
	"context"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/azsim/azsimtest"
)

// TestLostWhilePublishing: the connection is lost while the drain's
// publishes wait for paho's writer (the link stalled, the writer blocked on
// a full socket buffer, then the link died). Every publish must end with
// the session, not when paho's write timeout (30 s) lets the call go: the
// agent waits for its drain before it reconnects, and a hub that closes
// throttled connections met a drain that was always inside Publish.
func TestLostWhilePublishing(t *testing.T) {
	t.Parallel()
	az := azsimtest.Start(t, azsim.Config{})
	_, hubPort, _ := net.SplitHostPort(az.Info.Listen.Hub)
	r := startRelay(t, net.JoinHostPort("127.0.0.1", hubPort))
	cfg := az.FactoryConfig(t, "gw-lost-publishing")
	_, relayPort, _ := net.SplitHostPort(r.addr)
	cfg.Host = net.JoinHostPort("localhost", relayPort)
	sess := az.Dial(t, cfg)

	r.freeze() // the hub stops reading: the client's writes fill the socket
	body := []byte(strings.Repeat("x", 64<<10))
	published := make(chan []func(context.Context) error, 1)
	go func() {
		var waits []func(context.Context) error
		for range 400 { // 25 MiB: more than loopback's socket buffers hold
			waits = append(waits, sess.PublishTelemetry(body, nil, nil))
		}
		published <- waits
	}()
	time.Sleep(time.Second) // the writer is blocked, publishes queue behind it
	r.cut()
	select {
	case <-sess.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the session did not end within 10 s of its connection's end")
	}
	ended := time.Now()
	var waits []func(context.Context) error
	select {
	case waits = <-published:
	case <-time.After(10 * time.Second):
		t.Fatal("publishing still blocked 10 s after the session ended (paho's write timeout is 30 s)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	failed := 0
	for _, w := range waits {
		if w(ctx) != nil { // the drain sends it again on the next connection
			failed++
		}
	}
	if ctx.Err() != nil {
		t.Fatal("waiting for PUBACKs still blocked 10 s after the session ended")
	}
	if failed == 0 {
		t.Fatal("every publish was acknowledged: the hub never stopped reading, the test shows nothing")
	}
	t.Logf("%d of %d publishes ended with the session, within %v of its end", failed, len(waits), time.Since(ended).Round(time.Millisecond))
}

// relay forwards one TCP address; freeze stops reading from the client
// (as a stalled link does), cut closes every connection.
type relay struct {
	addr   string
	mu     sync.Mutex
	conns  []net.Conn
	frozen chan struct{}
	once   sync.Once
}

func startRelay(t *testing.T, upstream string) *relay {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{addr: l.Addr().String(), frozen: make(chan struct{})}
	t.Cleanup(func() { l.Close(); r.cut() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				c.Close()
				continue
			}
			r.mu.Lock()
			r.conns = append(r.conns, c, u)
			r.mu.Unlock()
			go io.Copy(c, u)
			go r.up(u, c)
		}
	}()
	return r
}

// up copies client to hub until frozen.
func (r *relay) up(dst, src net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		select {
		case <-r.frozen:
			return
		default:
		}
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (r *relay) freeze() { r.once.Do(func() { close(r.frozen) }) }

func (r *relay) cut() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range r.conns {
		c.Close()
	}
	r.conns = nil
}
