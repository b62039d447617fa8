package provisioning

// The HTTP/1.1 client for DPS's REST API: one keep-alive TLS connection per
// registration. Requests are written and answers parsed by net/http's
// (*Request).Write and ReadResponse, which are linked anyway (gorilla/websocket
// imports net/http); its Transport is not used, so there is no connection
// pool, HTTP/2 or proxy logic of its own. It dials through internal/mqttconn,
// so an HTTP proxy (CONNECT) applies as to DPS over MQTT. Every exchange is
// bounded in time (one deadline for the whole exchange) and in bytes (a budget
// under the buffered reader), so a hostile or broken server can neither hold
// a registration forever nor make the agent read without end.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"strings"
	"time"

	"github.com/gwagent/gwagent/internal/mqttconn"
)

const (
	// maxHTTPHeader bounds the status line and headers of one answer
	// (1xx answers included).
	maxHTTPHeader = 16 << 10
	// httpExchangeTimeout bounds one request and its answer.
	httpExchangeTimeout = time.Minute
)

// restConn is the connection to DPS's REST endpoint, dialled on first use
// and again after the server closed it.
type restConn struct {
	addr    string // host:port
	host    string // Host header
	tlsCfg  *tls.Config
	proxy   mqttconn.ProxyFunc // nil: direct
	timeout time.Duration      // per exchange; 0: httpExchangeTimeout
	conn    *tls.Conn
	budget  *budgetReader
	br      *bufio.Reader
	// deadline ends the current exchange.
	deadline time.Time
}

func (c *restConn) close() {
	if c.conn != nil {
		c.conn.Close()
		c.conn, c.br, c.budget = nil, nil, nil
	}
}

func (c *restConn) dial(ctx context.Context) error {
	// The same proxy rules and TLS dial as DPS over MQTT.
	conn, err := mqttconn.DialTLS(ctx, mqttconn.Options{TLS: c.tlsCfg, Proxy: c.proxy}, c.addr)
	if err != nil {
		return err
	}
	c.conn, c.budget = conn, &budgetReader{r: conn}
	c.br = bufio.NewReaderSize(c.budget, 4096)
	return nil
}

// budgetReader fails reads once the current answer has used its allowance.
type budgetReader struct {
	r    io.Reader
	left int64
	read int64 // bytes received in the current exchange
}

var errHTTPTooLarge = errors.New("answer larger than DPS ever sends")

func (b *budgetReader) Read(p []byte) (int, error) {
	if b.left <= 0 {
		return 0, fmt.Errorf("%w: %w", errHTTPMalformed, errHTTPTooLarge)
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.r.Read(p)
	b.left -= int64(n)
	b.read += int64(n)
	return n, err
}

// restResponse is what DPS answered.
type restResponse struct {
	status int
	header textproto.MIMEHeader
	body   []byte
}

// roundTrip sends one request and reads its response. A request on a
// reused connection that fails before any byte of an answer arrived is sent
// again once on a new connection (the server may have closed an idle
// keep-alive).
func (c *restConn) roundTrip(ctx context.Context, method, path string, header map[string]string, body []byte) (*restResponse, error) {
	for _, v := range header {
		if strings.ContainsAny(v, "\r\n") {
			return nil, errors.New("http: header value with a line break")
		}
	}
	for attempt := 0; ; attempt++ {
		if c.conn != nil && c.br.Buffered() > 0 {
			c.close() // bytes nobody asked for: the stream is out of step
		}
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
		answered := c.budget.read > 0
		c.close()
		if !reused || answered || attempt > 0 || ctx.Err() != nil || errors.Is(err, errHTTPMalformed) {
			return nil, err
		}
	}
}

var errHTTPMalformed = errors.New("malformed HTTP response")

func (c *restConn) exchange(ctx context.Context, method, path string, header map[string]string, body []byte) (*restResponse, error) {
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	timeout := c.timeout
	if timeout <= 0 {
		timeout = httpExchangeTimeout
	}
	c.deadline = time.Now().Add(timeout)
	c.conn.SetDeadline(c.deadline)
	c.budget.read, c.budget.left = 0, maxHTTPHeader

	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, "https://"+c.host+path, rd)
	if err != nil {
		return nil, fmt.Errorf("http: %w", err)
	}
	req.Host = c.host
	for k, v := range header {
		req.Header.Set(k, v)
	}
	bw := bufio.NewWriterSize(c.conn, 4096)
	if err := req.Write(bw); err != nil {
		return nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, err
	}

	var rsp *http.Response
	for informational := 0; ; informational++ {
		rsp, err = http.ReadResponse(c.br, req)
		if err != nil {
			return nil, c.explain(ctx, err, timeout)
		}
		// 1xx answers (100 Continue, 103 Early Hints) precede the real one.
		if rsp.StatusCode >= 200 || rsp.StatusCode == 101 || informational >= 5 {
			break
		}
		c.budget.left = maxHTTPHeader // each 1xx has its own header allowance
	}
	if rsp.StatusCode < 200 {
		rsp.Body.Close()
		return nil, fmt.Errorf("%w: status %d where a final answer belongs", errHTTPMalformed, rsp.StatusCode)
	}
	// Chunk framing costs bytes too: allow twice the body.
	c.budget.left = 2*maxDPSBody + maxHTTPHeader
	data, err := io.ReadAll(io.LimitReader(rsp.Body, maxDPSBody+1))
	rsp.Body.Close()
	if err != nil {
		return nil, c.explain(ctx, err, timeout)
	}
	if len(data) > maxDPSBody {
		return nil, fmt.Errorf("%w: %w (more than %d bytes of body)", errHTTPMalformed, errHTTPTooLarge, maxDPSBody)
	}
	if rsp.Close {
		c.close()
	}
	return &restResponse{status: rsp.StatusCode, header: textproto.MIMEHeader(rsp.Header), body: data}, nil
}

// explain turns a read error into one that says what the server did.
func (c *restConn) explain(ctx context.Context, err error, timeout time.Duration) error {
	err = shortError{err}
	switch {
	case ctx.Err() != nil || errors.Is(err, errHTTPMalformed):
		return err
	case c.budget.left <= 0:
		return fmt.Errorf("%w: %w", errHTTPMalformed, errHTTPTooLarge)
	case isTimeout(err) || !time.Now().Before(c.deadline):
		return fmt.Errorf("no complete answer within %v (%w)", timeout, err)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return fmt.Errorf("the server closed the connection in the middle of its answer (%w)", err)
	case c.budget.read > 0:
		return fmt.Errorf("%w: %w", errHTTPMalformed, err)
	}
	return err
}

// shortError keeps what a server echoed into a parse error from filling a
// log line.
type shortError struct{ err error }

func (e shortError) Error() string {
	if s := e.err.Error(); len(s) > 120 {
		return s[:120] + "…"
	}
	return e.err.Error()
}
func (e shortError) Unwrap() error { return e.err }

func isTimeout(err error) bool {
	var ne interface{ Timeout() bool }
	return errors.As(err, &ne) && ne.Timeout()
}
