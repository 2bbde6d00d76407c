package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"
)

// marker is the payload prefix the capture tests count: "MSNF <pod> <seq>".
func marker(pod string, seq int) string { return fmt.Sprintf("MSNF %s %d", pod, seq) }

func runUDP(ctx context.Context, args []string) error {
	var c common
	fs := flag.NewFlagSet("udp", flag.ContinueOnError)
	c.register(fs, 10)
	port := fs.String("port", "9999", "UDP port of -selector targets")
	size := fs.Int("size", 0, "pad each payload with '.' to at least this many bytes")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ts, err := resolveTargets(ctx, &c, func(ip string) string { return joinHostPort(ip, *port) })
	if err != nil {
		return err
	}
	// One unconnected socket: ICMP errors about earlier datagrams are never reported to it, so
	// a send either goes out or fails for its own reason, and the count stays exact.
	pc, err := net.ListenPacket("udp", ":0")
	if err != nil {
		return err
	}
	defer pc.Close()
	var sent, failed atomic.Int64
	stopReports := reportEvery(ctx, c.report, func() {
		logf("udp: %d sent, %d failed; targets %s", sent.Load(), failed.Load(), ts)
	})
	defer stopReports()
	err = pacer(ctx, c.rate, c.count, func(seq int) {
		target, werr := waitForTarget(ctx, ts)
		if werr != nil {
			return
		}
		addr, werr := net.ResolveUDPAddr("udp", target)
		if werr != nil {
			failed.Add(1)
			logf("udp: %s: %v", target, werr)
			return
		}
		payload := marker(c.pod, seq)
		if pad := *size - len(payload) - 1; pad > 0 {
			payload += " " + strings.Repeat(".", pad)
		}
		if _, werr := pc.WriteTo([]byte(payload), addr); werr != nil {
			failed.Add(1)
			logf("udp: %s seq %d: %v", target, seq, werr)
			return
		}
		sent.Add(1)
	})
	logf("udp: %d sent, %d failed; targets %s (done)", sent.Load(), failed.Load(), ts)
	if err != nil {
		return err
	}
	if c.count > 0 && sent.Load() != int64(c.count) {
		return &shortfall{fmt.Sprintf("%d of %d datagrams were sent", sent.Load(), c.count)}
	}
	return nil
}

func runUDPListen(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("udp-listen", flag.ContinueOnError)
	listen := fs.String("listen", ":9999", "address to receive on")
	quiet := fs.Bool("quiet", false, "print only counts, every 10 s, not each marker")
	if err := fs.Parse(args); err != nil {
		return err
	}
	pc, err := net.ListenPacket("udp", *listen)
	if err != nil {
		return err
	}
	go func() { <-ctx.Done(); pc.Close() }()
	var received atomic.Int64
	stop := reportEvery(ctx, 10*time.Second, func() { logf("udp-listen: %d received", received.Load()) })
	defer stop()
	logf("udp-listen: on %s", pc.LocalAddr())
	buf := make([]byte, 65536)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return err
		}
		received.Add(1)
		if !*quiet {
			text := string(buf[:n])
			if i := strings.Index(text, " ."); i >= 0 {
				text = text[:i]
			}
			logf("udp-listen: from %s: %q", from, text)
		}
	}
}
