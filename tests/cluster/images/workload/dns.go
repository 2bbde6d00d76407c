package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync/atomic"
	"time"
)

func runDNS(ctx context.Context, args []string) error {
	var c common
	fs := flag.NewFlagSet("dns", flag.ContinueOnError)
	c.register(fs, 2)
	zone := fs.String("zone", "demo.test", "zone the queried names are in")
	port := fs.String("port", "53", "DNS port of -selector targets")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ts, err := resolveTargets(ctx, &c, func(ip string) string { return joinHostPort(ip, *port) })
	if err != nil {
		return err
	}
	var sent, answered, failed atomic.Int64
	report := func(final bool) {
		logf("dns: %d sent, %d answered, %d failed; targets %s%s",
			sent.Load(), answered.Load(), failed.Load(), ts, map[bool]string{true: " (done)"}[final])
	}
	stopReports := reportEvery(ctx, c.report, func() { report(false) })
	defer stopReports()

	done := make(chan struct{}, 64)
	inflight := 0
	err = pacer(ctx, c.rate, c.count, func(seq int) {
		server, werr := waitForTarget(ctx, ts)
		if werr != nil {
			return
		}
		name := fmt.Sprintf("q-%s-%d.%s", c.pod, seq, strings.TrimSuffix(*zone, "."))
		sent.Add(1)
		inflight++
		go func() {
			defer func() { done <- struct{}{} }()
			rcode, answers, qerr := queryA(ctx, server, name, c.timeout)
			switch {
			case qerr != nil:
				failed.Add(1)
				logf("dns: %s from %s: %v", name, server, qerr)
			case rcode != 0 || answers == 0:
				failed.Add(1)
				logf("dns: %s from %s: rcode %d, %d answers", name, server, rcode, answers)
			default:
				answered.Add(1)
			}
		}()
		for len(done) > 0 {
			<-done
			inflight--
		}
	})
	for ; inflight > 0; inflight-- {
		<-done
	}
	report(true)
	if err != nil {
		return err
	}
	if c.count > 0 && answered.Load() != int64(c.count) {
		return &shortfall{fmt.Sprintf("%d of %d queries were answered", answered.Load(), c.count)}
	}
	return nil
}

// reportEvery calls f every interval until ctx ends or the returned stop is called.
func reportEvery(ctx context.Context, interval time.Duration, f func()) (stop func()) {
	if interval <= 0 {
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				f()
			}
		}
	}()
	return cancel
}

// dnsQuery encodes a standard query with recursion desired for one A record.
func dnsQuery(id uint16, name string) ([]byte, error) {
	msg := make([]byte, 12, 512)
	binary.BigEndian.PutUint16(msg[0:], id)
	binary.BigEndian.PutUint16(msg[2:], 0x0100) // RD
	binary.BigEndian.PutUint16(msg[4:], 1)      // QDCOUNT
	for _, label := range strings.Split(strings.TrimSuffix(name, "."), ".") {
		if len(label) == 0 || len(label) > 63 {
			return nil, fmt.Errorf("%q has a label of length %d", name, len(label))
		}
		msg = append(msg, byte(len(label)))
		msg = append(msg, label...)
	}
	msg = append(msg, 0, 0, 1, 0, 1) // root, QTYPE A, QCLASS IN
	if len(msg) > 512 {
		return nil, fmt.Errorf("%q is too long for a DNS query", name)
	}
	return msg, nil
}

// dnsAnswer checks that resp answers the query with this id and returns its rcode and ANCOUNT.
func dnsAnswer(resp []byte, id uint16) (rcode int, answers int, err error) {
	if len(resp) < 12 {
		return 0, 0, fmt.Errorf("a DNS answer of %d bytes, less than a header", len(resp))
	}
	if got := binary.BigEndian.Uint16(resp[0:]); got != id {
		return 0, 0, fmt.Errorf("answer ID %d, query ID %d", got, id)
	}
	flags := binary.BigEndian.Uint16(resp[2:])
	if flags&0x8000 == 0 {
		return 0, 0, errors.New("the reply is not a response (QR unset)")
	}
	return int(flags & 0xf), int(binary.BigEndian.Uint16(resp[6:])), nil
}

func queryA(ctx context.Context, server, name string, timeout time.Duration) (int, int, error) {
	id := uint16(rand.N(1 << 16))
	msg, err := dnsQuery(id, name)
	if err != nil {
		return 0, 0, err
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "udp", server)
	if err != nil {
		return 0, 0, err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return 0, 0, err
	}
	if _, err := conn.Write(msg); err != nil {
		return 0, 0, err
	}
	buf := make([]byte, 1500)
	for {
		n, err := conn.Read(buf)
		if err != nil {
			return 0, 0, err
		}
		rcode, answers, perr := dnsAnswer(buf[:n], id)
		if perr == nil {
			return rcode, answers, nil
		}
		// a stray or late datagram: keep waiting for ours until the deadline
	}
}
