package mqttconn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// A server on 443 that is not an MQTT-over-WebSockets endpoint (a web
// server, a captive portal) refuses the upgrade: the error says so and what
// to do, and keeps the server's status text short.
func TestWebSocketUpgradeRefused(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "0")
		w.WriteHeader(404)
	}))
	srv.StartTLS()
	t.Cleanup(srv.Close)
	addr := srv.Listener.Addr().String()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	tlsDial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		return tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := dialWebSocket(ctx, "wss://"+addr+WebSocketPath, tlsDial)
	if err == nil || !strings.Contains(err.Error(), "websocket upgrade refused: 404 Not Found; the server does not offer MQTT over WebSockets at /$iothub/websocket") ||
		!strings.Contains(err.Error(), `transport = "mqtt"`) {
		t.Fatalf("%v", err)
	}
}
