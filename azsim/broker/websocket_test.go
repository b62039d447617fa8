package broker_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/gwagent/gwagent/azsim/azsimtest"

	"github.com/gorilla/websocket"

	"github.com/gwagent/gwagent/azsim"
	"github.com/gwagent/gwagent/internal/tlsconf"
)

// The WebSocket listeners answer as Azure's do: only /$iothub/websocket,
// only with the mqtt subprotocol, only over TLS 1.2 or newer.
func TestWebSocketListener(t *testing.T) {
	az := azsimtest.Start(t, azsim.Config{})
	roots, err := tlsconf.LoadPool(az.Info.TrustBundle)
	if err != nil {
		t.Fatal(err)
	}
	for _, port := range []int{az.Info.DPSWebSocketPort, az.Info.HubWebSocketPort} {
		if port == 0 {
			t.Fatal("azsim info lists no WebSocket port")
		}
		base := "wss://localhost:" + strconv.Itoa(port)
		for _, tc := range []struct {
			name     string
			path     string
			protos   []string
			maxTLS   uint16
			status   int // 0: the TLS handshake fails
			upgraded bool
		}{
			{"ok/azure's path and subprotocol", "/$iothub/websocket", []string{"mqtt"}, 0, 101, true},
			{"ok/mqtt among others", "/$iothub/websocket", []string{"wamp", "mqtt"}, 0, 101, true},
			{"fail/other path", "/mqtt", []string{"mqtt"}, 0, 404, false},
			{"fail/no subprotocol", "/$iothub/websocket", nil, 0, 400, false},
			{"fail/wrong subprotocol", "/$iothub/websocket", []string{"mqttv3.1"}, 0, 400, false},
			{"fail/TLS 1.1", "/$iothub/websocket", []string{"mqtt"}, tls.VersionTLS11, 0, false},
		} {
			t.Run(strconv.Itoa(port)+"/"+tc.name, func(t *testing.T) {
				tc_ := &tls.Config{RootCAs: roots, ServerName: "localhost", MaxVersion: tc.maxTLS, MinVersion: tls.VersionTLS10}
				d := websocket.Dialer{TLSClientConfig: tc_, Subprotocols: tc.protos, HandshakeTimeout: 10 * time.Second}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				c, resp, err := d.DialContext(ctx, base+tc.path, http.Header{})
				if c != nil {
					defer c.Close()
				}
				if tc.status == 0 {
					if err == nil || resp != nil {
						t.Fatalf("handshake succeeded: %v", err)
					}
					return
				}
				if resp == nil {
					t.Fatalf("no HTTP answer: %v", err)
				}
				if resp.StatusCode != tc.status || (c != nil) != tc.upgraded {
					t.Fatalf("status %d (upgraded %v), want %d: %v", resp.StatusCode, c != nil, tc.status, err)
				}
				if c != nil && c.Subprotocol() != "mqtt" {
					t.Fatalf("subprotocol %q", c.Subprotocol())
				}
			})
		}
	}
}
