package mqttconn

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/gorilla/websocket"

	"github.com/gwagent/gwagent/internal/wsstream"
)

// dialWebSocket upgrades a connection that tlsDial opened (proxy tunnel and
// TLS with the client certificate included) to a WebSocket speaking the mqtt
// subprotocol, and returns it as a byte stream for paho.
func dialWebSocket(ctx context.Context, wsURL string, tlsDial func(context.Context, string, string) (net.Conn, error)) (net.Conn, error) {
	d := &websocket.Dialer{
		NetDialTLSContext: tlsDial,
		Subprotocols:      []string{Subprotocol},
		// MQTT packets are small; the defaults (4 KiB) are fine and keep
		// memory low.
		ReadBufferSize:  4096,
		WriteBufferSize: 4096,
	}
	c, resp, err := d.DialContext(ctx, wsURL, nil)
	if resp != nil && resp.Body != nil {
		resp.Body.Close()
	}
	if err != nil {
		if errors.Is(err, websocket.ErrBadHandshake) && resp != nil {
			// The status text is the server's; keep it short.
			return nil, fmt.Errorf("websocket upgrade refused: %d %.40s; the server does not offer MQTT over WebSockets at %s on this port: check the host name, or use [network] transport = \"mqtt\"",
				resp.StatusCode, strings.TrimSpace(strings.TrimPrefix(resp.Status, strconv.Itoa(resp.StatusCode))), WebSocketPath)
		}
		return nil, err
	}
	if c.Subprotocol() != Subprotocol {
		c.Close()
		return nil, fmt.Errorf("websocket: server chose subprotocol %q, not %q", c.Subprotocol(), Subprotocol)
	}
	return wsstream.New(c), nil
}
