// Package wsstream turns a WebSocket into the byte stream MQTT runs on: each
// Write is one binary message and Read runs across message boundaries, as
// MQTT over WebSockets allows a packet to span messages (MQTT 3.1.1 §6). A
// leaf utility shared by gwagent's connection layer (internal/mqttconn) and
// azsim's WebSocket listeners.
package wsstream

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gorilla/websocket"
)

// Conn is a WebSocket as a net.Conn.
type Conn struct {
	ws  *websocket.Conn
	r   io.Reader
	wmu sync.Mutex // gorilla allows one writer at a time
	// wdl is the write deadline. gorilla keeps its own in a plain field
	// that writers read, but net.Conn allows SetDeadline beside a Write
	// (mochi and paho do that): so it is handed to gorilla under wmu.
	wdl atomic.Pointer[time.Time]
}

var _ net.Conn = (*Conn)(nil)

// New wraps ws; the Conn owns it from now on.
func New(ws *websocket.Conn) *Conn { return &Conn{ws: ws} }

func (c *Conn) Read(p []byte) (int, error) {
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
				return 0, fmt.Errorf("websocket: peer sent a non-binary message (type %d); MQTT needs binary frames", typ)
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r, err = nil, nil
			if n == 0 {
				continue
			}
		}
		return n, err
	}
}

func (c *Conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	var dl time.Time
	if d := c.wdl.Load(); d != nil {
		dl = *d
	}
	if err := c.ws.SetWriteDeadline(dl); err != nil {
		return 0, err
	}
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close sends a close frame (best effort; WriteControl may run beside a
// blocked Write) and closes the connection.
func (c *Conn) Close() error {
	_ = c.ws.WriteControl(websocket.CloseMessage, websocket.FormatCloseMessage(websocket.CloseNormalClosure, ""), time.Now().Add(time.Second))
	return c.ws.Close()
}

func (c *Conn) LocalAddr() net.Addr  { return c.ws.LocalAddr() }
func (c *Conn) RemoteAddr() net.Addr { return c.ws.RemoteAddr() }

func (c *Conn) SetDeadline(t time.Time) error {
	return errors.Join(c.SetReadDeadline(t), c.SetWriteDeadline(t))
}

// SetReadDeadline is safe beside Read: gorilla passes it to the socket.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.ws.SetReadDeadline(t) }

// SetWriteDeadline applies to the next Write and, through the socket, to
// one in progress (so a blocked Write can be cut short).
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.wdl.Store(&t)
	return c.ws.NetConn().SetWriteDeadline(t)
}
