package provisioning

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gwagent/gwagent/internal/tlsconf"
)

// The hand-written HTTP/1.1 client against net/http's server: fixed and
// chunked bodies, keep-alive, a server that closes, a malformed answer.
func TestRestConn(t *testing.T) {
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		switch r.URL.Path {
		case "/chunked":
			w.Write([]byte(`{"a":`))
			w.(http.Flusher).Flush()
			w.Write([]byte(`1}`))
		case "/close":
			w.Header().Set("Connection", "close")
			w.Write([]byte("bye"))
		default:
			w.Header().Set("Retry-After", "3")
			w.WriteHeader(202)
			w.Write(append([]byte("echo:"), b...))
		}
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	addr, tc := startTLS(t, srv)
	c := &restConn{addr: addr, host: addr, tlsCfg: tc}
	defer c.close()
	ctx := context.Background()

	rsp, err := c.roundTrip(ctx, "PUT", "/x", map[string]string{"Content-Type": "application/json"}, []byte(`{"q":1}`))
	if err != nil || rsp.status != 202 || string(rsp.body) != `echo:{"q":1}` || rsp.header.Get("Retry-After") != "3" {
		t.Fatalf("%+v %v", rsp, err)
	}
	rsp, err = c.roundTrip(ctx, "GET", "/chunked", nil, nil)
	if err != nil || string(rsp.body) != `{"a":1}` {
		t.Fatalf("chunked: %+v %v", rsp, err)
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d connections for two requests; keep-alive expected", n)
	}
	if rsp, err = c.roundTrip(ctx, "GET", "/close", nil, nil); err != nil || string(rsp.body) != "bye" || c.conn != nil {
		t.Fatalf("close: %+v %v (conn kept: %v)", rsp, err, c.conn != nil)
	}
	// The idle connection dies under us: one transparent redial.
	if _, err := c.roundTrip(ctx, "GET", "/x", nil, nil); err != nil {
		t.Fatal(err)
	}
	srv.CloseClientConnections()
	if _, err := c.roundTrip(ctx, "GET", "/x", nil, nil); err != nil {
		t.Fatalf("after the server dropped the idle connection: %v", err)
	}
	if _, err := c.roundTrip(ctx, "GET", "/x", map[string]string{"X": "a\r\nInjected: 1"}, nil); err == nil {
		t.Fatal("a header with CRLF was sent")
	}
}

// A hostile or broken DPS endpoint (or something pretending to be one on
// the path) must not hold a registration forever, make the agent read
// without end, or have a half-answered request sent twice. The server
// hijacks the connection and writes raw bytes, which net/http's server
// would never send on its own.
func TestRestConnHostileServer(t *testing.T) {
	type script func(w net.Conn) error
	endless := func(w net.Conn, head string, unit string) error {
		if _, err := io.WriteString(w, head); err != nil {
			return err
		}
		for i := 0; i < (16<<20)/len(unit); i++ { // 16 MiB at most, so an unbounded client fails the test
			if _, err := io.WriteString(w, unit); err != nil {
				return err
			}
		}
		return errors.New("the client read 16 MiB of one answer")
	}
	scripts := map[string]script{
		"/ok": func(w net.Conn) error {
			_, err := io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
			return err
		},
		"/continue": func(w net.Conn) error {
			_, err := io.WriteString(w, "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n"+
				"HTTP/1.1 202 Accepted\r\nContent-Length: 4\r\nRetry-After: 2\r\n\r\nwait")
			return err
		},
		"/switch": func(w net.Conn) error {
			_, err := io.WriteString(w, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
			return err
		},
		"/huge-header-line": func(w net.Conn) error {
			return endless(w, "HTTP/1.1 200 OK\r\nX-Junk: ", strings.Repeat("a", 4096))
		},
		"/many-headers": func(w net.Conn) error {
			return endless(w, "HTTP/1.1 200 OK\r\n", "X-A: b\r\n")
		},
		"/endless-chunks": func(w net.Conn) error {
			return endless(w, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "1000\r\n"+strings.Repeat("c", 0x1000)+"\r\n")
		},
		"/endless-close-delimited": func(w net.Conn) error {
			return endless(w, "HTTP/1.1 200 OK\r\n\r\n", strings.Repeat("d", 4096))
		},
		"/bad-chunk-size": func(w net.Conn) error {
			_, err := io.WriteString(w, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
			return err
		},
		"/huge-chunk-size": func(w net.Conn) error {
			_, err := io.WriteString(w, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7fffffffffffffff\r\nabc")
			return err
		},
		"/big-content-length": func(w net.Conn) error {
			_, err := io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\nabc")
			return err
		},
		"/short-body": func(w net.Conn) error { // then the server closes mid-body
			_, err := io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
			return err
		},
		"/garbage": func(w net.Conn) error {
			_, err := io.WriteString(w, "SSH-2.0-OpenSSH_9.2\r\n\r\n")
			return err
		},
		"/slow-loris": func(w net.Conn) error { // a byte now and then, never the end of the headers
			if _, err := io.WriteString(w, "HTTP/1.1 200 OK\r\n"); err != nil {
				return err
			}
			for i := 0; i < 6000; i++ {
				if _, err := w.Write([]byte("X")); err != nil {
					return err
				}
				time.Sleep(10 * time.Millisecond)
			}
			return errors.New("the client waited a minute for a slow server")
		},
	}
	var mu sync.Mutex
	requests := map[string]int{}
	serverErr := make(chan error, 64)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		requests[r.URL.Path]++
		mu.Unlock()
		conn, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			serverErr <- err
			return
		}
		defer conn.Close()
		if err := scripts[r.URL.Path](conn); err != nil && !isConnGone(err) {
			serverErr <- fmt.Errorf("%s: %w", r.URL.Path, err)
		}
	}))
	addr, tc := startTLS(t, srv)
	ctx := context.Background()
	newConn := func() *restConn {
		c := &restConn{addr: addr, host: addr, tlsCfg: tc, timeout: 2 * time.Second}
		t.Cleanup(c.close)
		return c
	}

	c := newConn()
	rsp, err := c.roundTrip(ctx, "PUT", "/continue", nil, []byte("{}"))
	if err != nil || rsp.status != 202 || string(rsp.body) != "wait" || rsp.header.Get("Retry-After") != "2" {
		t.Fatalf("1xx before the answer: %+v %v", rsp, err)
	}

	for _, path := range []string{"/switch", "/huge-header-line", "/many-headers", "/endless-chunks",
		"/endless-close-delimited", "/bad-chunk-size", "/huge-chunk-size", "/big-content-length", "/short-body",
		"/garbage", "/slow-loris"} {
		c := newConn()
		// A first answer on the connection, so the hostile one comes on a
		// reused connection, where a failed request may be sent again.
		if rsp, err := c.roundTrip(ctx, "GET", "/ok", nil, nil); err != nil || string(rsp.body) != "ok" {
			t.Fatalf("%s: first request: %+v %v", path, rsp, err)
		}
		start := time.Now()
		rsp, err := c.roundTrip(ctx, "PUT", path, nil, []byte(`{"registrationId":"x"}`))
		if err == nil {
			t.Errorf("%s: accepted: status %d, %d bytes", path, rsp.status, len(rsp.body))
		} else {
			t.Logf("%s: %v (%v)", path, err, time.Since(start).Round(time.Millisecond))
			if want := map[string]string{"/slow-loris": "no complete answer within", "/short-body": "closed the connection",
				"/endless-chunks": "larger than", "/huge-header-line": "larger than"}[path]; !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %q does not say %q", path, err, want)
			}
			if len(err.Error()) > 300 {
				t.Errorf("%s: %d bytes of error text", path, len(err.Error()))
			}
		}
		mu.Lock()
		n := requests[path]
		mu.Unlock()
		if n != 1 {
			t.Errorf("%s: the request was sent %d times after a partial answer", path, n)
		}
		if c.conn != nil {
			t.Errorf("%s: the connection was kept after a broken answer", path)
		}
	}
	for {
		select {
		case err := <-serverErr:
			t.Error(err)
		default:
			return
		}
	}
}

func isConnGone(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET)
}

// startTLS starts srv with TLS (closed at the end of the test) and returns
// its address and a client TLS config that trusts it.
func startTLS(t *testing.T, srv *httptest.Server) (string, *tls.Config) {
	t.Helper()
	srv.StartTLS()
	t.Cleanup(srv.Close)
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	addr := strings.TrimPrefix(srv.URL, "https://")
	tc, err := tlsconf.Client(addr, roots, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return addr, tc
}
