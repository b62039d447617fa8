package provisioning

import (
	"bufio"
	"context"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

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
	srv.StartTLS()
	defer srv.Close()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	addr := strings.TrimPrefix(srv.URL, "https://")
	tc, err := tlsconf.Client(addr, roots, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
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

func TestReadChunkedLimits(t *testing.T) {
	for name, in := range map[string]string{
		"too big":    "ffffff\r\n",
		"bad size":   "zz\r\n",
		"no CRLF":    "3\r\nabcX",
		"truncated":  "5\r\nab",
		"no trailer": "0\r\n",
	} {
		if _, err := readChunked(bufioReader(in), 1024); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	got, err := readChunked(bufioReader("3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"), 1024)
	if err != nil || string(got) != "abcde" {
		t.Fatalf("%q %v", got, err)
	}
}

func bufioReader(s string) *bufio.Reader { return bufio.NewReader(strings.NewReader(s)) }
