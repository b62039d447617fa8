package provisioning

// A minimal HTTP/1.1 client for DPS's REST API: one keep-alive TLS
// connection per registration, requests with a JSON body, responses with
// Content-Length or chunked bodies. net/http would do the same but adds
// about 0.8 MB to the CGO-free arm64 binary (its Transport brings HTTP/2 and
// more), for the two request shapes DPS needs. It dials through
// internal/mqttconn, so an HTTP proxy (CONNECT) applies as to DPS over MQTT.

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/gwagent/gwagent/internal/mqttconn"
)

// restConn is the connection to DPS's REST endpoint, dialled on first use
// and again after the server closed it.
type restConn struct {
	addr   string // host:port
	host   string // Host header
	tlsCfg *tls.Config
	proxy  mqttconn.ProxyFunc // nil: direct
	conn   *tls.Conn
	br     *bufio.Reader
}

func (c *restConn) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn, c.br = nil, nil
	}
}

func (c *restConn) dial(ctx context.Context) error {
	// The same proxy rules and TLS dial as DPS over MQTT.
	conn, err := mqttconn.DialTLS(ctx, mqttconn.Options{TLS: c.tlsCfg, Proxy: c.proxy}, c.addr)
	if err != nil {
		return err
	}
	c.conn, c.br = conn, bufio.NewReaderSize(conn, 4096)
	return nil
}

// restResponse is what DPS answered.
type restResponse struct {
	status int
	header textproto.MIMEHeader
	body   []byte
}

// roundTrip sends one request and reads its response. A request on a
// reused connection that fails before any answer is sent again once on a
// new connection (the server may have closed an idle keep-alive).
func (c *restConn) roundTrip(ctx context.Context, method, path string, header map[string]string, body []byte) (*restResponse, error) {
	for _, v := range header {
		if strings.ContainsAny(v, "\r\n") {
			return nil, errors.New("http: header value with a line break")
		}
	}
	for attempt := 0; ; attempt++ {
		reused := c.conn != nil
		if !reused {
			if err := c.dial(ctx); err != nil {
				return nil, err
			}
		}
		rsp, err := c.exchange(ctx, method, path, header, body)
		if err == nil {
			return rsp, nil
		}
		c.close()
		if !reused || attempt > 0 || ctx.Err() != nil || errors.Is(err, errHTTPMalformed) {
			return nil, err
		}
	}
}

var errHTTPMalformed = errors.New("malformed HTTP response")

func (c *restConn) exchange(ctx context.Context, method, path string, header map[string]string, body []byte) (*restResponse, error) {
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	c.conn.SetDeadline(time.Now().Add(time.Minute))

	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: %s\r\n", method, path, c.host)
	for k, v := range header {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	if body != nil {
		fmt.Fprintf(&b, "Content-Length: %d\r\n", len(body))
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(c.conn, b.String()); err != nil {
		return nil, err
	}
	if _, err := c.conn.Write(body); err != nil {
		return nil, err
	}

	tp := textproto.NewReader(c.br)
	line, err := tp.ReadLine()
	if err != nil {
		return nil, err
	}
	proto, rest, _ := strings.Cut(line, " ")
	code, _, _ := strings.Cut(rest, " ")
	status, err := strconv.Atoi(code)
	if !strings.HasPrefix(proto, "HTTP/1.") || err != nil || status < 100 || status > 999 {
		return nil, fmt.Errorf("%w: status line %q", errHTTPMalformed, truncate(line, 80))
	}
	h, err := tp.ReadMIMEHeader()
	if err != nil {
		return nil, fmt.Errorf("%w: headers: %v", errHTTPMalformed, err)
	}
	rsp := &restResponse{status: status, header: h}
	switch {
	case strings.EqualFold(h.Get("Transfer-Encoding"), "chunked"):
		rsp.body, err = readChunked(c.br, maxDPSBody)
	case h.Get("Content-Length") != "":
		n, perr := strconv.Atoi(h.Get("Content-Length"))
		if perr != nil || n < 0 || n > maxDPSBody {
			return nil, fmt.Errorf("%w: Content-Length %q", errHTTPMalformed, h.Get("Content-Length"))
		}
		rsp.body = make([]byte, n)
		_, err = io.ReadFull(c.br, rsp.body)
	case status == 204 || status == 304 || status < 200:
	default: // body until the server closes
		rsp.body, err = io.ReadAll(io.LimitReader(c.br, maxDPSBody))
		h.Set("Connection", "close")
	}
	if err != nil {
		return nil, err
	}
	if strings.EqualFold(h.Get("Connection"), "close") {
		c.close()
	}
	return rsp, nil
}

// readChunked decodes a chunked body of at most max bytes.
func readChunked(br *bufio.Reader, max int) ([]byte, error) {
	tp := textproto.NewReader(br)
	var out []byte
	for {
		line, err := tp.ReadLine()
		if err != nil {
			return nil, err
		}
		sizeStr, _, _ := strings.Cut(line, ";")
		n, err := strconv.ParseInt(strings.TrimSpace(sizeStr), 16, 32)
		if err != nil || n < 0 || len(out)+int(n) > max {
			return nil, fmt.Errorf("%w: chunk size %q", errHTTPMalformed, truncate(line, 20))
		}
		if n == 0 {
			_, err := tp.ReadMIMEHeader() // trailers
			return out, err
		}
		chunk := make([]byte, n+2)
		if _, err := io.ReadFull(br, chunk); err != nil {
			return nil, err
		}
		if string(chunk[n:]) != "\r\n" {
			return nil, fmt.Errorf("%w: chunk not followed by CRLF", errHTTPMalformed)
		}
		out = append(out, chunk[:n]...)
	}
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}
