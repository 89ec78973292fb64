/**
 * What the server's frames do to the users the client knows, and which events follow: only
 * real changes. A reply that repeats a user's state reports nothing; after a reconnect the
 * resubscription is compared with what the client knew, so the application hears only of the
 * changes it missed. No socket here: the client feeds frames in, and emits what comes out.
 */

import type { IdentityError, UpdateReason, WireUser } from "./protocol.js";
import { User, type UserOwner } from "./user.js";

/** An event the state produces, for the client to emit. */
export type PresenceEvent =
  | { kind: "userSubscribed"; user: User }
  | { kind: "userUnsubscribed"; user: User }
  | { kind: "userUpdated"; user: User; updateReasons: UpdateReason[] };

function updated(user: User, updateReasons: UpdateReason[]): PresenceEvent[] {
  return updateReasons.length === 0 ? [] : [{ kind: "userUpdated", user, updateReasons }];
}

/** The own user and the subscribed ones, keyed by identity. */
export class PresenceState {
  /** The client's own user; always subscribed. */
  readonly own: User;
  private readonly users = new Map<string, User>();
  /** Unsubscribed users whose objects may still be held, so a new subscribe revives them. */
  private readonly detached = new Map<string, WeakRef<User>>();
  private readonly owner: UserOwner;

  constructor(own: WireUser, owner: UserOwner) {
    this.owner = owner;
    this.own = new User(own, true, owner);
  }

  /** The own user or a subscribed one. */
  get(identity: string): User | undefined {
    return identity === this.own.identity ? this.own : this.users.get(identity);
  }

  /** The subscribed users, the own one not included. */
  subscribed(): User[] {
    return [...this.users.values()];
  }

  /** The identities to subscribe again after a reconnect. */
  identities(): string[] {
    return [...this.users.keys()];
  }

  /** A `welcome` after a reconnect: the own user's changes. */
  welcome(own: WireUser): PresenceEvent[] {
    return updated(this.own, this.own._replace(own));
  }

  /** A `subscribed` reply to the application: the users, in the reply's order, and events. */
  subscribe(users: WireUser[]): { users: User[]; events: PresenceEvent[] } {
    const handles: User[] = [];
    const events: PresenceEvent[] = [];
    for (const wire of users) {
      const known = this.get(wire.identity);
      if (known !== undefined) {
        events.push(...updated(known, known._replace(wire)));
        handles.push(known);
        continue;
      }
      let user = this.detached.get(wire.identity)?.deref();
      this.detached.delete(wire.identity);
      if (user === undefined) {
        user = new User(wire, true, this.owner);
      } else {
        user._replace(wire);
        user._setSubscribed(true);
      }
      this.users.set(wire.identity, user);
      events.push({ kind: "userSubscribed", user });
      handles.push(user);
    }
    return { users: handles, events };
  }

  /**
   * The resubscription after a reconnect: users whose state changed meanwhile are reported;
   * users the server no longer has are unsubscribed.
   */
  resubscribe(users: WireUser[], errors: IdentityError[]): PresenceEvent[] {
    const events: PresenceEvent[] = [];
    for (const wire of users) {
      const user = this.users.get(wire.identity);
      if (user !== undefined) {
        events.push(...updated(user, user._replace(wire)));
      }
    }
    for (const error of errors) {
      events.push(...this.unsubscribe([error.identity]));
    }
    return events;
  }

  /** An `unsubscribed` reply for these identities (the own one is never unsubscribed). */
  unsubscribe(identities: string[]): PresenceEvent[] {
    const events: PresenceEvent[] = [];
    for (const identity of identities) {
      const user = this.users.get(identity);
      if (user === undefined) {
        continue;
      }
      this.users.delete(identity);
      user._setSubscribed(false);
      for (const [id, ref] of this.detached) {
        if (ref.deref() === undefined) this.detached.delete(id);
      }
      this.detached.set(identity, new WeakRef(user));
      events.push({ kind: "userUnsubscribed", user });
    }
    return events;
  }

  /**
   * A `user_updated` push. Without reasons from the server, the reasons are what changed; an
   * update of a user no longer watched is dropped.
   */
  update(wire: WireUser, reasons: UpdateReason[]): PresenceEvent[] {
    const user = this.get(wire.identity);
    if (user === undefined) {
      return [];
    }
    const changed = user._replace(wire);
    return updated(user, reasons.length > 0 ? reasons : changed);
  }

  /**
   * Reachability was disabled: the server sends no per-user frames, and every user's flags
   * read `null` from now on (docs/protocol.md, "Presence rules").
   */
  reachabilityDisabled(): PresenceEvent[] {
    const events: PresenceEvent[] = [];
    for (const user of [this.own, ...this.users.values()]) {
      const nulled = { ...user.toJSON(), is_online: null, is_notifiable: null, last_seen_at: null };
      events.push(...updated(user, user._replace(nulled)));
    }
    return events;
  }
}
