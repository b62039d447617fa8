package mqttconn

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/gorilla/websocket"
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
			return nil, fmt.Errorf("websocket upgrade refused: %s", resp.Status)
		}
		return nil, err
	}
	if c.Subprotocol() != Subprotocol {
		c.Close()
		return nil, fmt.Errorf("websocket: server chose subprotocol %q, not %q", c.Subprotocol(), Subprotocol)
	}
	return &wsConn{ws: c}, nil
}

// wsConn is a WebSocket as a byte stream: each Write is one binary message;
// Read runs across message boundaries, as MQTT over WebSockets allows a
// packet to span messages.
type wsConn struct {
	ws  *websocket.Conn
	r   io.Reader
	wmu sync.Mutex // gorilla allows one writer at a time
}

var _ net.Conn = (*wsConn)(nil)

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			typ, r, err := c.ws.NextReader()
			if err != nil {
				var ce *websocket.CloseError
				if errors.As(err, &ce) {
					return 0, io.EOF
				}
				return 0, err
			}
			if typ != websocket.BinaryMessage {
				return 0, fmt.Errorf("websocket: server sent a non-binary message (type %d)", typ)
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			err = nil
			if n == 0 {
				continue
			}
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *wsConn) Close() error {
	// A close frame first, as the protocol asks; best effort, and
	// WriteControl may run beside a blocked Write.
	_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	return c.ws.Close()
}

func (c *wsConn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *wsConn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }

func (c *wsConn) SetDeadline(t time.Time) error {
	return errors.Join(c.ws.SetReadDeadline(t), c.ws.SetWriteDeadline(t))
}
func (c *wsConn) SetReadDeadline(t time.Time) error  { return c.ws.SetReadDeadline(t) }
func (c *wsConn) SetWriteDeadline(t time.Time) error { return c.ws.SetWriteDeadline(t) }
