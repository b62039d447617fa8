package mqttconn_test

// Proxy faults a real proxy does not produce on demand, from a scripted fake
// proxy (a mock, on purpose): a tunnel closed right after 200, no answer at
// all, an answer that never ends.

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/gwagent/gwagent/internal/mqttconn"
)

// fakeProxy accepts connections, reads the CONNECT request and runs answer.
func fakeProxy(t *testing.T, answer func(c net.Conn)) *url.URL {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
					return
				}
				answer(c)
			}()
		}
	}()
	return &url.URL{Scheme: "http", Host: l.Addr().String(), User: url.UserPassword("u", "fake-pw")}
}

// A proxy that wants credentials when none are configured says how to
// give them.
func TestProxyWantsCredentials(t *testing.T) {
	px := fakeProxy(t, func(c net.Conn) {
		c.Write([]byte("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"plant\"\r\nContent-Length: 0\r\n\r\n"))
	})
	px.User = nil
	_, err := mqttconn.DialTLS(context.Background(), mqttconn.Options{TLS: &tls.Config{ServerName: "hub.example"},
		Proxy: mqttconn.Proxy(px, ""), Timeout: 5 * time.Second}, "hub.example:443")
	if err == nil || !strings.Contains(err.Error(), "it needs a user name and password: write the proxy as http://user:password@host:port") {
		t.Fatalf("%v", err)
	}
}

func TestProxyFaults(t *testing.T) {
	for _, tc := range []struct {
		name     string
		answer   func(c net.Conn)
		closed   bool
		fallback bool // auto tried WebSockets after it
	}{
		{"fail/tunnel closed right after 200", func(c net.Conn) { c.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n")) }, true, true},
		{"fail/closed without an answer", func(c net.Conn) {}, true, true},
		{"fail/an answer that never ends", func(c net.Conn) {
			c.Write([]byte("HTTP/1.1 200 OK\r\n"))
			for {
				if _, err := c.Write([]byte("X-Filler: " + strings.Repeat("a", 1000) + "\r\n")); err != nil {
					return
				}
			}
		}, true, true},
		{"fail/no answer until the timeout", func(c net.Conn) { time.Sleep(5 * time.Second) }, true, true},
		{"fail/407 asking for NTLM or Negotiate only", func(c net.Conn) {
			c.Write([]byte("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: NTLM\r\nProxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n"))
		}, false, false},
		{"fail/407 offering Basic among others", func(c net.Conn) {
			c.Write([]byte("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate, Basic realm=\"plant\"\r\nContent-Length: 0\r\n\r\n"))
		}, false, false},
		{"fail/502 from the proxy", func(c net.Conn) { c.Write([]byte("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")) }, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			px := fakeProxy(t, tc.answer)
			d, err := mqttconn.Configure(context.Background(), mqtt.NewClientOptions(), mqttconn.Options{
				Host: "hub.example:8883", Transport: mqttconn.Auto, TLS: &tls.Config{ServerName: "hub.example"},
				Proxy: mqttconn.Proxy(px, ""), Timeout: time.Second, FallbackTimeout: 300 * time.Millisecond,
			})
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			c, err := d.Open(context.Background())
			if err == nil {
				c.Close()
				t.Fatal("connected")
			}
			if time.Since(start) > 20*time.Second {
				t.Fatalf("took %s: the timeout did not hold", time.Since(start))
			}
			var pe *mqttconn.ProxyError
			if !errors.As(err, &pe) || !errors.Is(err, mqttconn.ErrProxy) || pe.Closed != tc.closed {
				t.Fatalf("err %v (%#v)", err, pe)
			}
			msg := err.Error()
			if !strings.Contains(msg, px.Host) || strings.Contains(msg, "fake-pw") {
				t.Fatalf("error must name the proxy without its password: %s", msg)
			}
			if strings.Contains(tc.name, "timeout") && !strings.Contains(msg, "did not answer") {
				t.Fatalf("a silent proxy is not reported as such: %s", msg)
			}
			if want := map[string]string{
				"fail/an answer that never ends":             "more than 65536 bytes of headers",
				"fail/407 asking for NTLM or Negotiate only": "asks for NTLM, Negotiate authentication, and gwagent speaks only Basic",
				"fail/407 offering Basic among others":       "check the user name and password",
			}[tc.name]; !strings.Contains(msg, want) {
				t.Fatalf("error does not say %q: %s", want, msg)
			}
			if got := strings.Contains(msg, "WebSockets"); got != tc.fallback {
				t.Fatalf("fallback to WebSockets = %v, want %v: %s", got, tc.fallback, msg)
			}
		})
	}
}
