/**
 * A small typed event emitter with the `on`/`off`/`once` names of Node's `EventEmitter`, which
 * the hosted SDKs' objects also use; it works in browsers and Node alike.
 */

/** Listener of event `K` of an event map `E`. */
export type Listener<E, K extends keyof E> = (payload: E[K]) => void;

/** Emits the events of map `E` (event name -> payload type). */
export class Emitter<E> {
  private readonly listeners = new Map<keyof E, Set<(payload: never) => void>>();

  /** Calls `listener` on every `event`. */
  on<K extends keyof E>(event: K, listener: Listener<E, K>): this {
    let set = this.listeners.get(event);
    if (set === undefined) {
      set = new Set();
      this.listeners.set(event, set);
    }
    set.add(listener as (payload: never) => void);
    return this;
  }

  /** Calls `listener` on the next `event` only. */
  once<K extends keyof E>(event: K, listener: Listener<E, K>): this {
    const wrapped: Listener<E, K> = (payload) => {
      this.off(event, wrapped);
      listener(payload);
    };
    return this.on(event, wrapped);
  }

  /** Stops calling `listener` on `event`. */
  off<K extends keyof E>(event: K, listener: Listener<E, K>): this {
    this.listeners.get(event)?.delete(listener as (payload: never) => void);
    return this;
  }

  /** Removes every listener (of `event`, or of all events). */
  removeAllListeners(event?: keyof E): this {
    if (event === undefined) {
      this.listeners.clear();
    } else {
      this.listeners.delete(event);
    }
    return this;
  }

  /**
   * Calls the listeners of `event` in the order they were added. A listener that throws does
   * not stop the others; its error is reported asynchronously, as an uncaught one.
   */
  protected emit<K extends keyof E>(event: K, payload: E[K]): void {
    const set = this.listeners.get(event);
    if (set === undefined) {
      return;
    }
    for (const listener of [...set]) {
      try {
        (listener as Listener<E, K>)(payload);
      } catch (error) {
        queueMicrotask(() => {
          throw error;
        });
      }
    }
  }
}
